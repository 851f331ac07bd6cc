"""The recipes as presets: the values `--recipe keras|fast` gives every TrainConfig field left at None."""

# What each recipe sets (any field the user leaves at None). Values for the fast recipe: the short recipe of docs/recipe.md
# (SGD-Nesterov, one cycle 0.015 -> 0.15 -> 0 over 30 epochs, decay 5e-4 = 2 x 2.5e-4 on weights only, label
# smoothing 0.1, whole-pixel shifts of up to 4 px, PyTorch's padding and BatchNorm momentum).
RECIPES = {
    "keras": {"padding": "same", "bn_momentum": 0.01, "epochs": 200, "schedule_epochs": 200, "optimizer": "adam",
              "lr": 1e-3, "weight_decay": 1e-4, "weight_decay_on": "conv", "label_smoothing": 0.0,
              "lr_policy": "keras", "shift": "bilinear", "max_shift": 0.1, "flip": "random"},
    "fast": {"padding": "symmetric", "bn_momentum": 0.1, "epochs": 30, "optimizer": "sgd", "lr": 0.15,
             "weight_decay": 2.5e-4, "weight_decay_on": "weights", "label_smoothing": 0.1, "lr_policy": "onecycle",
             "shift": "pixel", "max_shift": 0.125, "flip": "random"},
}
