"""daralign: online alignment from AI feedback — Direct Advantage Regression and its baselines in
one loop. The Python API (docs/python-api.md):

    import daralign
    trainer = daralign.Trainer(model="bundled:smollm2-135m-instruct", reward_funcs=[my_reward],
                               args=daralign.TrainConfig(algorithm="dar", max_steps=10), train_dataset=rows)
    trainer.train()
"""

__version__ = "0.1.0"

# Loaded on first use, so that `daralign --version` and the CLI's help do not import torch.
_EXPORTS = {"Trainer": "daralign.api", "TrainConfig": "daralign.api", "TrainerState": "daralign.api",
            "as_reward_func": "daralign.api", "dar_weights": "daralign.objectives.dar"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'daralign' has no attribute {name!r}")
