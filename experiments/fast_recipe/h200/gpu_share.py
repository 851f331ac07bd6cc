"""How many one-GPU training processes share an H200 before each slows down: the project's ResNet-20 and the fast
recipe's SGD step (bf16 autocast, channels_last), on random images already on the GPU. Planning only.

    python gpu_share.py --procs 1 8   # each count: that many processes at once, images/s each and in all
"""
import argparse, multiprocessing as mp, time

def work(batch, steps, q, barrier):
    import torch, torch.nn.functional as F
    from distributed_resnet.model import ResNet
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    model = ResNet(padding="symmetric").to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
    x = torch.rand(batch, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for _ in range(30): step()
    torch.cuda.synchronize(); barrier.wait()
    t = time.perf_counter()
    for _ in range(steps): step()
    torch.cuda.synchronize(); q.put(batch * steps / (time.perf_counter() - t))

if __name__ == "__main__":
    p = argparse.ArgumentParser(); p.add_argument("--procs", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--batch", type=int, nargs="+", default=[128]); p.add_argument("--steps", type=int, default=300)
    a = p.parse_args(); ctx = mp.get_context("spawn")
    for b in a.batch:
        for n in a.procs:
            q, bar = ctx.Queue(), ctx.Barrier(n); ps = [ctx.Process(target=work, args=(b, a.steps, q, bar)) for _ in range(n)]
            [x.start() for x in ps]
            rates = [q.get() for _ in range(n)]; [x.join() for x in ps]
            print(f"batch {b}, {n} process(es): {sum(rates)/n:,.0f} images/s each, {sum(rates):,.0f} in all", flush=True)
