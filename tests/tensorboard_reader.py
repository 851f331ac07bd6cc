"""Read TensorBoard event files back with tensorboardX's own protobufs (no tensorboard package needed)."""

import struct
from collections import defaultdict
from pathlib import Path


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every events.out.tfevents.* file in `folder` (not recursive)."""
    from tensorboardX.proto.event_pb2 import Event

    out = defaultdict(list)
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4  # length, its crc, the record, its crc
            event = Event.FromString(record)
            for value in event.summary.value:
                out[value.tag].append((event.step, value.simple_value))
    return dict(out)
