"""PEFT 0.21.2's own test matrix as data: the rows of ``TEST_CASES`` in PEFT 0.21.2's
``tests/test_custom_models.py`` and the tiny models they run on, for ``test_peft_matrix.py``.

``ROWS`` holds the 331 rows ``(row id, model id, PEFT config class name, config keywords)`` in PEFT's
order, extracted once from that file (with ``ast``; nothing here reads PEFT's tests). Config classes
are NAMES (strings), resolved against the installed ``peft`` at run time; a nested config object
(``kasa_config=KasaConfig()``, ``use_bdlora=BdLoraConfig(...)``, ...) is written as a dict with the
key ``"__config__"`` naming its class. PEFT's file repeats 15 test names (its ten WaveFT rows twice, word
for word; three MiSS names, ``"transformers Conv1D 1 IA3"`` and ``"Conv2d2 1 BOFT"`` with other
keywords); the second copy gets ``" #2"`` appended, so every row id is unique and can be a pytest id.

The models (``MODELS``) are re-implemented for this test, not imported: each is the list of named
layers of PEFT's model class of the same id, with the same layer names, types and shapes (so that
``target_modules`` select the same layers), built by :func:`tests.parity.conftest.build_model` with
every parameter drawn from a NumPy seed. They have no whole-model ``forward``: the sweep compares
merged state dicts and per-layer forwards, never the model's output.

``MAY_REFUSE`` lists the rows of claimed methods (``CLAIMED``) that peftmath may answer with a refusal
instead of PEFT's numbers, each with the reason; a row of another config class must be refused (or, once
peftmath implements that method, give PEFT's numbers).
"""

from __future__ import annotations

__all__ = ["ROWS", "MODELS", "CLAIMED", "MAY_REFUSE", "build", "config_class", "make_config", "expected"]

#: the PEFT config classes whose methods peftmath implements (README feature table)
CLAIMED = frozenset({
    "LoraConfig", "AdaLoraConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "OFTConfig", "BOFTConfig", "VeraConfig",
    "HRAConfig", "RoadConfig", "FourierFTConfig",
    "HiraConfig",
    "MissConfig",
    "DeloraConfig",
    "VBLoRAConfig",
    "RandLoraConfig",
    "C3AConfig",
    "ShiraConfig",
    "WaveFTConfig",
    "OSFConfig",
    "GraloraConfig",
    "PveraConfig",
    "FrodConfig",
    "GloraConfig",
    "PsoftConfig",
    "LilyConfig",
    "AdamssConfig",
    "DeftConfig",
    "SupertuningConfig",
    "BeftConfig",
    "PeanutConfig",
    "TinyLoraConfig",
    "UniLoraConfig",
    "LNTuningConfig",
    "TrainableTokensConfig",
})

#: rows of claimed methods where a clear refusal is as good as PEFT's numbers: LoRA variants that change
#: the math or add tensors (issue 15, item 3) and DoRA on grouped convs. (LoRA on a grouped conv is not
#: here: PEFT cannot merge it, so a refused merge with PEFT's forward is a pass.)
MAY_REFUSE: dict[str, str] = {
    "Conv2d Groups LoRA with DoRA": "DoRA on a grouped conv (PEFT's norm mixes output channels)",
    "Conv2d Groups2 LoRA with DoRA": "DoRA on a grouped conv (PEFT's norm mixes output channels)",
    **dict.fromkeys(("Vanilla MLP 1 UniLora", "Vanilla MLP 2 UniLora", "Vanilla MLP 3 UniLora", "Vanilla MLP 4 UniLora",
                     "Vanilla MLP 5 UniLora", "Embedding + transformers Conv1D 1 UniLora"),
                    "UniLoRA with save_indices=False saves theta_d only: the modules, their indices and scales come "
                    "from the model's module order, which the checkpoint lacks (specs/unilora.md)"),
}


def expected(row) -> frozenset[str]:
    """The outcomes that satisfy the sweep for ``row``: PEFT's numbers always; a clear refusal where
    the method or the variant is not claimed."""
    name, _, cls, _ = row
    if cls not in CLAIMED or name in MAY_REFUSE:
        return frozenset({"pass", "refused"})
    return frozenset({"pass"})


# --------------------------------------------------------------------------------------------------
# the tiny models (same layer names and shapes as PEFT's test models of the same id)
# --------------------------------------------------------------------------------------------------
def _layers(model_id: str) -> dict:
    import torch
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    class ParamLinear(nn.Module):
        """A linear layer that holds its weight as a bare ``(in, out)`` parameter (PEFT's
        ``_LinearUsingParameter``, targeted with ``target_parameters``)."""

        def __init__(self, n_in: int, n_out: int):
            super().__init__()
            self.in_features, self.out_features = n_in, n_out
            self.weight = nn.Parameter(torch.zeros(n_in, n_out))
            self.bias = nn.Parameter(torch.zeros(n_out))

        def forward(self, x):
            return x @ self.weight + self.bias

    act = lambda: {"relu": nn.ReLU(), "flat": nn.Flatten()}  # noqa: E731
    head = lambda n_in: {"lin0": nn.Linear(n_in, 2), "sm": nn.LogSoftmax(dim=-1)}  # noqa: E731
    mlp = lambda hidden: {"lin0": nn.Linear(10, hidden), "relu": nn.ReLU(), "drop": nn.Dropout(0.5),  # noqa: E731
                          "lin1": nn.Linear(hidden, 2), "sm": nn.LogSoftmax(dim=-1)}
    table = {
        "MLP": lambda: mlp(20),
        "MLP2": lambda: mlp(32),
        "MLP_LayerNorm": lambda: {"layernorm0": nn.LayerNorm(10, 10), "lin0": nn.Linear(10, 20), "relu": nn.ReLU(),
                                  "drop": nn.Dropout(0.5), "layernorm1": nn.LayerNorm(20, 20),
                                  "lin1": nn.Linear(20, 2), "sm": nn.LogSoftmax(dim=-1)},
        "MlpUsingParameters": lambda: {"lin0": ParamLinear(10, 20), "relu": nn.ReLU(), "drop": nn.Dropout(0.5),
                                       "lin1": ParamLinear(20, 2), "sm": nn.LogSoftmax(dim=-1)},
        "EmbConv1D": lambda: {"emb": nn.Embedding(100, 5), "conv1d": Conv1D(1, 5), **act(), **head(10)},
        "Conv1d": lambda: {"conv1d": nn.Conv1d(1, 1, 2), **act(), **head(9)},
        "Conv1dBigger": lambda: {"conv1d": nn.Conv1d(64, 16, 2), **act(), **head(144)},
        "Conv1dGroups": lambda: {"conv1d": nn.Conv1d(8, 8, 3, groups=2), **act(), **head(64)},
        "Conv2d": lambda: {"conv2d": nn.Conv2d(5, 10, 3), **act(), **head(10)},
        "Conv2d1x1": lambda: {"conv2d": nn.Conv2d(1, 10, kernel_size=(1, 1), padding=0), **act(), **head(90)},
        "Conv2dGroups": lambda: {"lin0": nn.Linear(90, 288), "conv2d": nn.Conv2d(16, 16, 3, groups=8), **act(),
                                 "lin1": nn.Linear(16, 2), "sm": nn.LogSoftmax(dim=-1)},
        "Conv2dGroups2": lambda: {"conv2d": nn.Conv2d(16, 32, 3, padding=1, groups=2), **act(), **head(12800)},
        "Conv2d2": lambda: {"lin0": nn.Linear(10, 40), "conv2d": nn.Conv2d(8, 32, 3), **act(),
                            "lin1": nn.Linear(32, 2), "sm": nn.LogSoftmax(dim=-1)},
        "Conv3d": lambda: {"conv3d": nn.Conv3d(5, 10, 3), **act(), **head(10)},
        "MHA": lambda: {"mha": nn.MultiheadAttention(10, 2), **head(10)},
    }
    return table[model_id]()


#: the model ids of PEFT's ``MockTransformerWrapper`` that ``ROWS`` uses
MODELS = ("MLP", "MLP2", "MLP_LayerNorm", "MlpUsingParameters", "EmbConv1D", "Conv1d", "Conv1dBigger",
          "Conv1dGroups", "Conv2d", "Conv2d1x1", "Conv2dGroups", "Conv2dGroups2", "Conv2d2", "Conv3d", "MHA")


def build(model_id: str, *, seed: int = 0):
    """A fresh float32 model ``model_id``, every parameter drawn from ``numpy.random.default_rng(seed)``
    (weights N(0, 1/fan_in), biases N(0, 0.1²); :func:`tests.parity.conftest.build_model`)."""
    from tests.parity.conftest import build_model

    return build_model(_layers(model_id), seed=seed)


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------
def config_class(name: str):
    """The installed PEFT's config class called ``name`` (``BdLoraConfig`` lives in the LoRA tuner)."""
    import peft

    cls = getattr(peft, name, None)
    if cls is None:
        from peft.tuners.lora import config as lora_config

        cls = getattr(lora_config, name)
    return cls


def make_config(name: str, kwargs: dict):
    """``ConfigClass(**kwargs)`` with the nested ``{"__config__": name, ...}`` dicts built too."""

    def resolve(value):
        if isinstance(value, dict):
            if "__config__" in value:
                return config_class(value["__config__"])(
                    **{k: resolve(v) for k, v in value.items() if k != "__config__"})
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    return config_class(name)(**resolve(kwargs))


# --------------------------------------------------------------------------------------------------
# the rows
# --------------------------------------------------------------------------------------------------
#: the ten WaveFT rows, which PEFT's TEST_CASES holds twice (the copies get " #2")
_WAVEFT = [
    ("Vanilla MLP 1 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin0", "n_frequency": 8}),
    ("Vanilla MLP 2 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin0"], "n_frequency": 8}),
    ("Vanilla MLP 3 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin1"], "n_frequency": 8}),
    ("Vanilla MLP 4 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin0", "lin1"], "n_frequency": 8}),
    (
        "Vanilla MLP 5 WaveFT", "MLP", "WaveFTConfig",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "n_frequency": 8},
    ),
    (
        "Vanilla MLP 6 WaveFT", "MLP", "WaveFTConfig",
        {"target_modules": ["lin0"], "n_frequency": 8, "scaling": 25.0, "wavelet_family": "db1"},
    ),
    (
        "Vanilla MLP 7 WaveFT", "MLP", "WaveFTConfig",
        {"target_modules": "lin1", "n_frequency": 8, "use_idwt": False},
    ),
    (
        "Vanilla MLP 8 WaveFT", "MLP", "WaveFTConfig",
        {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "sym2"},
    ),
    (
        "Vanilla MLP 9 WaveFT", "MLP", "WaveFTConfig",
        {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "sym2", "use_idwt": False},
    ),
    (
        "Vanilla MLP 10 WaveFT", "MLP", "WaveFTConfig",
        {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "db1", "proportional_parameters": True},
    ),
]


def _again(rows, n: int) -> list:
    """``rows`` again, each id followed by ``" #n"``."""
    return [(f"{name} #{n}", *rest) for name, *rest in rows]


#: PEFT 0.21.2 tests/test_custom_models.py TEST_CASES: (row id, model id, config class, config keywords)
ROWS: list[tuple[str, str, str, dict]] = [
    ("Vanilla MLP 1 GLoRA", "MLP", "GloraConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 GLoRA", "MLP", "GloraConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 GLoRA", "MLP", "GloraConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 GLoRA", "MLP", "GloraConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 GLoRA", "MLP", "GloraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    (
        "Vanilla MLP 6 GLoRA", "MLP", "GloraConfig",
        {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"]},
    ),
    ("Vanilla MLP 1 LoRA", "MLP", "LoraConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    (
        "Vanilla MLP 1 LoRA with KaSA", "MLP", "LoraConfig",
        {"target_modules": ["lin0"], "kasa_config": {"__config__": "KasaConfig"}, "r": 4},
    ),
    (
        "Vanilla MLP 1 LoRA with MiCA", "MLP", "LoraConfig",
        {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4},
    ),
    (
        "Vanilla MLP 9 LoRA with DoRA", "MLP", "LoraConfig",
        {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32},
    ),
    (
        "Vanilla MLP 10 LoRA with VeLoRA random", "MLP", "LoraConfig",
        {
            "target_modules": ["lin0"],
            "velora_config": {"__config__": "VeloraConfig", "num_groups": 2, "init_type": "random"},
        },
    ),
    (
        "Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP", "LoraConfig",
        {
            "target_modules": ["lin0", "lin1"],
            "velora_config": {"__config__": "VeloraConfig", "num_groups": 2, "init_type": "batch_average"},
        },
    ),
    (
        "Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP", "LoraConfig",
        {
            "target_modules": ["lin0"],
            "velora_config": {"__config__": "VeloraConfig", "num_groups": 2, "init_type": "batch_average_once"},
        },
    ),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb", "conv1d"]}),
    (
        "Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", "LoraConfig",
        {"target_modules": ["conv1d"], "use_dora": True},
    ),
    (
        "Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", "LoraConfig",
        {"target_modules": ["emb"], "use_dora": True},
    ),
    (
        "Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", "LoraConfig",
        {"target_modules": ["emb", "conv1d"], "use_dora": True},
    ),
    (
        "Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", "LoraConfig",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
    ),
    ("Conv1d LoRA", "Conv1d", "LoraConfig", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", "LoraConfig", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", "LoraConfig", {"target_modules": ["conv2d"]}),
    (
        "Conv2d Groups LoRA with DoRA", "Conv2dGroups", "LoraConfig",
        {"target_modules": ["conv2d"], "use_dora": True},
    ),
    (
        "Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", "LoraConfig",
        {"target_modules": ["conv2d"], "use_dora": True},
    ),
    ("Conv3d 1 LoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    (
        "Vanilla MLP 1 LoRA with lora_b bias", "MLP", "LoraConfig",
        {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
    ),
    (
        "Conv2d 1 LoRA with lora_b bias", "Conv2d", "LoraConfig",
        {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32},
    ),
    (
        "Conv3d 1 LoRA with lora_b bias", "Conv3d", "LoraConfig",
        {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32},
    ),
    ("MHA 1 LoRA", "MHA", "LoraConfig", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", "LoraConfig", {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", "LoraConfig", {"target_parameters": ["lin0.weight"]}),
    (
        "MLP 2 using nn.Parameter LoRA", "MLP", "LoraConfig",
        {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]},
    ),
    (
        "Vanilla MLP 1 LoRA with Monteclora", "MLP", "LoraConfig",
        {"target_modules": ["lin0"], "monteclora_config": {"__config__": "MontecloraConfig", "num_samples": 2}},
    ),
    ("Vanilla MLP 1 IA3", "MLP", "IA3Config", {"target_modules": "lin0", "feedforward_modules": []}),
    ("Vanilla MLP 2 IA3", "MLP", "IA3Config", {"target_modules": "lin0", "feedforward_modules": "lin0"}),
    ("Vanilla MLP 3 IA3", "MLP", "IA3Config", {"target_modules": ["lin0"], "feedforward_modules": []}),
    ("Vanilla MLP 4 IA3", "MLP", "IA3Config", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]}),
    ("Vanilla MLP 5 IA3", "MLP", "IA3Config", {"target_modules": ["lin1"], "feedforward_modules": []}),
    ("Vanilla MLP 6 IA3", "MLP", "IA3Config", {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]}),
    ("Vanilla MLP 7 IA3", "MLP", "IA3Config", {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
    (
        "Vanilla MLP 8 IA3", "MLP", "IA3Config",
        {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0", "lin1"]},
    ),
    (
        "Vanilla MLP 9 IA3", "MLP", "IA3Config",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "feedforward_modules": ["lin0"]},
    ),
    (
        "transformers Conv1D 1 IA3", "EmbConv1D", "IA3Config",
        {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"]},
    ),
    (
        "transformers Conv1D 2 IA3", "EmbConv1D", "IA3Config",
        {"target_modules": ["conv1d", "lin0"], "feedforward_modules": ["conv1d", "lin0"]},
    ),
    (
        "transformers Conv1D 1 IA3 #2", "EmbConv1D", "IA3Config",
        {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"], "modules_to_save": ["lin0"]},
    ),
    ("Conv2d 1 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": []}),
    ("Conv2d 2 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}),
    ("Conv2d 3 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}),
    (
        "Conv2d 4 IA3", "Conv2d", "IA3Config",
        {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]},
    ),
    (
        "Conv2d 5 IA3", "Conv2d", "IA3Config",
        {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d", "lin0"]},
    ),
    ("Conv3d 1 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d"], "feedforward_modules": []}),
    ("Conv3d 2 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}),
    ("Conv3d 3 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}),
    (
        "Conv3d 4 IA3", "Conv3d", "IA3Config",
        {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]},
    ),
    (
        "Conv3d 5 IA3", "Conv3d", "IA3Config",
        {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d", "lin0"]},
    ),
    ("Vanilla MLP 1 BEFT", "MLP", "BeftConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 BEFT", "MLP", "BeftConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 BEFT", "MLP", "BeftConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 BEFT", "MLP", "BeftConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 BEFT", "MLP", "BeftConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 1 LOHA", "MLP", "LoHaConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LOHA", "MLP", "LoHaConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LOHA", "MLP", "LoHaConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LOHA", "MLP", "LoHaConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LOHA", "MLP", "LoHaConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LOHA", "MLP", "LoHaConfig", {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    ("Vanilla MLP 7 LOHA", "MLP", "LoHaConfig", {"target_modules": "lin0", "rank_dropout": 0.5}),
    ("Conv2d 1 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    ("Conv1d LOHA", "Conv1d", "LoHaConfig", {"target_modules": ["conv1d"]}),
    ("Conv1d LOHA 1", "Conv1d", "LoHaConfig", {"target_modules": ["conv1d"]}),
    ("Conv1d LOHA 2", "Conv1d", "LoHaConfig", {"target_modules": ["conv1d"], "r": 2}),
    ("Conv1d Groups LOHA", "Conv1dGroups", "LoHaConfig", {"target_modules": ["conv1d"], "r": 4}),
    (
        "Conv1d LOHA 3", "Conv1dBigger", "LoHaConfig",
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True},
    ),
    (
        "Conv1d LOHA 4", "Conv1dBigger", "LoHaConfig",
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False},
    ),
    ("Conv2d 1x1 LOHA", "Conv2d1x1", "LoHaConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LOHA", "Conv2dGroups", "LoHaConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LOHA", "Conv2dGroups2", "LoHaConfig", {"target_modules": ["conv2d"]}),
    ("Vanilla MLP 1 LOKR", "MLP", "LoKrConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LOKR", "MLP", "LoKrConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LOKR", "MLP", "LoKrConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LOKR", "MLP", "LoKrConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LOKR", "MLP", "LoKrConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LOKR", "MLP", "LoKrConfig", {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    ("Vanilla MLP 7 LOKR", "MLP", "LoKrConfig", {"target_modules": "lin0", "rank_dropout": 0.5}),
    (
        "Vanilla MLP 8 LOKR", "MLP", "LoKrConfig",
        {"target_modules": "lin0", "decompose_both": True, "r": 1, "alpha": 1},
    ),
    ("Conv1d LOKR 1", "Conv1d", "LoKrConfig", {"target_modules": ["conv1d"]}),
    ("Conv1d LOKR 2", "Conv1d", "LoKrConfig", {"target_modules": ["conv1d"], "r": 2}),
    ("Conv1d Groups LOKR", "Conv1dGroups", "LoKrConfig", {"target_modules": ["conv1d"], "r": 4}),
    (
        "Conv1d LOKR 3", "Conv1dBigger", "LoKrConfig",
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True},
    ),
    (
        "Conv1d LOKR 4", "Conv1dBigger", "LoKrConfig",
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False},
    ),
    ("Conv2d 1 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    ("Conv2d 1x1 LOKR", "Conv2d1x1", "LoKrConfig", {"target_modules": ["conv2d"]}),
    (
        "Conv2d 5 LOKR", "Conv2d", "LoKrConfig",
        {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_both": True},
    ),
    (
        "Conv2d 6 LOKR", "Conv2d", "LoKrConfig",
        {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_factor": 4},
    ),
    (
        "Conv2d 7 LOKR", "Conv2d", "LoKrConfig",
        {
            "target_modules": ["conv2d", "lin0"],
            "use_effective_conv2d": True,
            "decompose_both": True,
            "decompose_factor": 4,
        },
    ),
    ("Conv2d Groups LOKR", "Conv2dGroups", "LoKrConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LOKR", "Conv2dGroups2", "LoKrConfig", {"target_modules": ["conv2d"]}),
    (
        "Vanilla MLP 1 OFT", "MLP", "OFTConfig",
        {"r": 2, "oft_block_size": 0, "target_modules": "lin0", "use_cayley_neumann": False},
    ),
    (
        "Vanilla MLP 2 OFT", "MLP", "OFTConfig",
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "use_cayley_neumann": False},
    ),
    (
        "Vanilla MLP 5 OFT", "MLP", "OFTConfig",
        {
            "r": 2,
            "oft_block_size": 0,
            "target_modules": ["lin0"],
            "modules_to_save": ["lin1"],
            "use_cayley_neumann": False,
        },
    ),
    (
        "Vanilla MLP 6 OFT", "MLP", "OFTConfig",
        {
            "r": 2,
            "oft_block_size": 0,
            "target_modules": ["lin0"],
            "module_dropout": 0.1,
            "use_cayley_neumann": False,
        },
    ),
    (
        "Vanilla MLP 7 OFT", "MLP", "OFTConfig",
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "coft": True, "eps": 0.01},
    ),
    (
        "Vanilla MLP 8 OFT", "MLP", "OFTConfig",
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "block_share": True, "use_cayley_neumann": False},
    ),
    (
        "Vanilla MLP 9 OFT", "MLP", "OFTConfig",
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "coft": True, "eps": 0.01, "block_share": True},
    ),
    (
        "Vanilla MLP 10 OFT", "MLP", "OFTConfig",
        {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "use_cayley_neumann": True},
    ),
    (
        "Vanilla MLP 11 OFT", "MLP", "OFTConfig",
        {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "use_cayley_neumann": False},
    ),
    (
        "Vanilla MLP 12 OFT", "MLP", "OFTConfig",
        {
            "r": 0,
            "oft_block_size": 2,
            "target_modules": ["lin0"],
            "coft": True,
            "eps": 0.01,
            "block_share": True,
            "use_cayley_neumann": True,
        },
    ),
    (
        "Vanilla MLP 13 OFT", "MLP", "OFTConfig",
        {
            "r": 0,
            "oft_block_size": 2,
            "target_modules": ["lin0"],
            "coft": True,
            "eps": 0.01,
            "block_share": True,
            "use_cayley_neumann": False,
        },
    ),
    (
        "Embedding + transformers Conv1D 1 OFT", "EmbConv1D", "OFTConfig",
        {"r": 1, "oft_block_size": 0, "target_modules": ["emb"]},
    ),
    (
        "Embedding + transformers Conv1D 2 OFT", "EmbConv1D", "OFTConfig",
        {"r": 1, "oft_block_size": 0, "target_modules": ["emb"], "block_share": True},
    ),
    ("Conv2d 1 OFT", "Conv2d", "OFTConfig", {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"]}),
    (
        "Conv2d 3 OFT", "Conv2d", "OFTConfig",
        {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True},
    ),
    (
        "Conv2d 4 OFT", "Conv2d", "OFTConfig",
        {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "block_share": True},
    ),
    (
        "Conv2d 5 OFT", "Conv2d", "OFTConfig",
        {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True, "block_share": True},
    ),
    ("Vanilla MLP 1 DEFT", "MLP", "DeftConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 DEFT", "MLP", "DeftConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 DEFT", "MLP", "DeftConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 4 DEFT qr", "MLP", "DeftConfig", {"target_modules": ["lin0"], "decomposition_method": "qr"}),
    ("Vanilla MLP 5 DEFT", "MLP", "DeftConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    (
        "Vanilla MLP 7 DEFT alpha", "MLP", "DeftConfig",
        {"target_modules": ["lin0"], "decomposition_method": "qr", "alpha": 16},
    ),
    (
        "Vanilla MLP 8 DEFT PaRa relu", "MLP", "DeftConfig",
        {"target_modules": ["lin0"], "decomposition_method": "relu", "para": True},
    ),
    (
        "Vanilla MLP 9 DEFT PaRa qr", "MLP", "DeftConfig",
        {"target_modules": ["lin0"], "decomposition_method": "qr", "para": True},
    ),
    ("Embedding + transformers Conv1D 1 DEFT", "EmbConv1D", "DeftConfig", {"target_modules": ["conv1d"]}),
    ("Vanilla MLP 1 HRA", "MLP", "HRAConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 HRA", "MLP", "HRAConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 HRA", "MLP", "HRAConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 HRA", "MLP", "HRAConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Conv2d 1 HRA", "Conv2d", "HRAConfig", {"target_modules": ["conv2d"]}),
    ("Vanilla MLP 1 MiSS", "MLP", "MissConfig", {"target_modules": "lin0", "r": 2}),
    ("Vanilla MLP 2 MiSS", "MLP", "MissConfig", {"target_modules": ["lin0"], "r": 2}),
    ("Vanilla MLP 3 MiSS", "MLP", "MissConfig", {"target_modules": ["lin0", "lin1"], "r": 2}),
    ("Vanilla MLP 5 MiSS", "MLP", "MissConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2}),
    ("Vanilla MLP 1 MiSS #2", "MLP", "MissConfig", {"target_modules": "lin0", "r": 2, "init_weights": "bat"}),
    ("Vanilla MLP 2 MiSS #2", "MLP", "MissConfig", {"target_modules": ["lin0"], "r": 2, "init_weights": "bat"}),
    (
        "Vanilla MLP 3 MiSS with bat", "MLP", "MissConfig",
        {"target_modules": ["lin0", "lin1"], "r": 2, "init_weights": "bat"},
    ),
    (
        "Vanilla MLP 5 MiSS #2", "MLP", "MissConfig",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2, "init_weights": "bat"},
    ),
    ("LayerNorm 1 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": "layernorm0"}),
    ("LayerNorm 2 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": ["layernorm0"]}),
    (
        "LayerNorm 3 LNTuning", "MLP_LayerNorm", "LNTuningConfig",
        {"target_modules": ["layernorm0"], "modules_to_save": ["layernorm1"]},
    ),
    ("Linear 4 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": "lin0"}),
    ("Linear 5 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 1 BOFT", "MLP", "BOFTConfig", {"target_modules": ["lin1"], "boft_block_size": 2}),
    (
        "Vanilla MLP 2 BOFT", "MLP", "BOFTConfig",
        {"target_modules": ["lin1"], "modules_to_save": ["lin0"], "boft_block_size": 2},
    ),
    (
        "Vanilla MLP 3 BOFT", "MLP", "BOFTConfig",
        {"target_modules": ["lin1"], "boft_block_size": 2, "boft_dropout": 0.1},
    ),
    (
        "Vanilla MLP 4 BOFT", "MLP", "BOFTConfig",
        {"target_modules": ["lin1"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 1},
    ),
    (
        "Vanilla MLP 5 BOFT", "MLP", "BOFTConfig",
        {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 1},
    ),
    (
        "Vanilla MLP 6 BOFT", "MLP", "BOFTConfig",
        {"target_modules": ["lin1"], "boft_block_size": 10, "boft_block_num": 0, "boft_n_butterfly_factor": 2},
    ),
    (
        "Conv2d 1 BOFT", "Conv2d", "BOFTConfig",
        {"target_modules": ["conv2d"], "boft_block_size": 45, "boft_block_num": 0, "boft_n_butterfly_factor": 1},
    ),
    (
        "Conv2d 2 BOFT", "Conv2d", "BOFTConfig",
        {"target_modules": ["conv2d"], "boft_block_size": 0, "boft_block_num": 1, "boft_n_butterfly_factor": 1},
    ),
    (
        "MLP2 1 BOFT", "MLP2", "BOFTConfig",
        {"target_modules": ["lin1"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 3},
    ),
    (
        "MLP2 2 BOFT", "MLP2", "BOFTConfig",
        {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 3},
    ),
    (
        "Conv2d2 1 BOFT", "Conv2d2", "BOFTConfig",
        {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 2},
    ),
    (
        "Conv2d2 1 BOFT #2", "Conv2d2", "BOFTConfig",
        {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 3},
    ),
    ("Vanilla MLP 1 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": "lin0"}),
    ("Vanilla MLP 2 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": ["lin0"]}),
    ("Vanilla MLP 3 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": ["lin1"]}),
    ("Vanilla MLP 4 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": ["lin0", "lin1"], "random_seed": 56}),
    ("Vanilla MLP 5 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": ["lin0"]}),
    ("Vanilla MLP 1 Supertuning", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": "lin0"}),
    ("Vanilla MLP 2 Supertuning", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": ["lin0"]}),
    ("Vanilla MLP 3 Supertuning", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": ["lin1"]}),
    (
        "Vanilla MLP 4 Supertuning bottom-k", "MLP", "SupertuningConfig",
        {"sparsity": 0.5, "target_modules": ["lin0", "lin1"], "select_top": False},
    ),
    (
        "Vanilla MLP 5 Supertuning Supra (r=2)", "MLP", "SupertuningConfig",
        {"sparsity": 0.5, "target_modules": ["lin0"], "r": 2},
    ),
    ("Vanilla MLP 1 VeRA", "MLP", "VeraConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 VeRA", "MLP", "VeraConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 VeRA", "MLP", "VeraConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 VeRA", "MLP", "VeraConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 VeRA", "MLP", "VeraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Embedding + transformers Conv1D 1 VeRA", "EmbConv1D", "VeraConfig", {"target_modules": ["conv1d"]}),
    ("Vanilla MLP 1 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": "lin0", "r": 2, "u": 16}),
    ("Vanilla MLP 2 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": ["lin0"], "r": 2, "u": 16}),
    ("Vanilla MLP 3 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": ["lin1"], "r": 2, "u": 16}),
    ("Vanilla MLP 4 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": ["lin0", "lin1"], "r": 2, "u": 32}),
    (
        "Vanilla MLP 5 TinyLoRA", "MLP", "TinyLoraConfig",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2, "u": 16},
    ),
    (
        "Vanilla MLP TinyLoRA weight_tying", "MLP", "TinyLoraConfig",
        {"target_modules": ["lin0", "lin1"], "r": 2, "u": 8, "weight_tying": 1.0},
    ),
    (
        "Embedding + transformers Conv1D 1 TinyLoRA", "EmbConv1D", "TinyLoraConfig",
        {"target_modules": ["conv1d"], "r": 2, "u": 16, "init_v_bound": 0.5},
    ),
    (
        "Embedding + transformers Conv1D 2 TinyLoRA", "EmbConv1D", "TinyLoraConfig",
        {"target_modules": ["emb"], "r": 2, "u": 16},
    ),
    ("Vanilla MLP 1 PVeRA", "MLP", "PveraConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 PVeRA", "MLP", "PveraConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 PVeRA", "MLP", "PveraConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 PVeRA", "MLP", "PveraConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 PVeRA", "MLP", "PveraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Embedding + transformers Conv1D 1 PVeRA", "EmbConv1D", "PveraConfig", {"target_modules": ["conv1d"]}),
    (
        "Vanilla MLP 1 FourierFT", "MLP", "FourierFTConfig",
        {"n_frequency": 10, "target_modules": "lin0", "init_weights": True},
    ),
    (
        "Vanilla MLP 2 FourierFT", "MLP", "FourierFTConfig",
        {"n_frequency": 10, "target_modules": ["lin0"], "init_weights": True},
    ),
    (
        "Vanilla MLP 3 FourierFT", "MLP", "FourierFTConfig",
        {"n_frequency": 10, "target_modules": ["lin1"], "init_weights": True},
    ),
    (
        "Vanilla MLP 5 FourierFT", "MLP", "FourierFTConfig",
        {"n_frequency": 10, "target_modules": ["lin0"], "modules_to_save": ["lin1"], "init_weights": True},
    ),
    (
        "Vanilla MLP 6 FourierFT", "MLP", "FourierFTConfig",
        {"n_frequency": 10, "target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], "init_weights": True},
    ),
    (
        "Vanilla MLP 7 FourierFT", "MLP", "FourierFTConfig",
        {
            "n_frequency_pattern": {"lin0": 5, "lin1": 10},
            "target_modules": ["lin0", "lin1"],
            "modules_to_save": ["lin1"],
            "init_weights": True,
        },
    ),
    ("Vanilla MLP 1 GraLoRA", "MLP", "GraloraConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 GraLoRA", "MLP", "GraloraConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 GraLoRA", "MLP", "GraloraConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 GraLoRA", "MLP", "GraloraConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 GraLoRA", "MLP", "GraloraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    (
        "Vanilla MLP 6 GraLoRA", "MLP", "GraloraConfig",
        {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"]},
    ),
    (
        "Vanilla MLP 7 Hybrid GraLoRA", "MLP", "GraloraConfig",
        {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], "hybrid_r": 4},
    ),
    (
        "Embedding + transformers Conv1D 1 GraLoRA", "EmbConv1D", "GraloraConfig",
        {"target_modules": ["conv1d"], "gralora_k": 1},
    ),
    (
        "Vanilla MLP 1 VBLoRA", "MLP", "VBLoRAConfig",
        {"target_modules": "lin0", "vector_length": 1, "num_vectors": 5},
    ),
    (
        "Vanilla MLP 2 VBLoRA", "MLP", "VBLoRAConfig",
        {"target_modules": ["lin0"], "vector_length": 1, "num_vectors": 5},
    ),
    (
        "Vanilla MLP 3 VBLoRA", "MLP", "VBLoRAConfig",
        {"target_modules": ["lin1"], "vector_length": 2, "num_vectors": 5},
    ),
    (
        "Vanilla MLP 4 VBLoRA", "MLP", "VBLoRAConfig",
        {"target_modules": ["lin0", "lin1"], "vector_length": 1, "num_vectors": 5},
    ),
    (
        "Vanilla MLP 5 VBLoRA", "MLP", "VBLoRAConfig",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "vector_length": 1, "num_vectors": 5},
    ),
    (
        "Embedding + transformers Conv1D 1 VBLoRA", "EmbConv1D", "VBLoRAConfig",
        {"target_modules": ["conv1d"], "vector_length": 1, "num_vectors": 2},
    ),
    (
        "Embedding + transformers Conv1D 1 trainable_tokens", "EmbConv1D", "TrainableTokensConfig",
        {"target_modules": ["emb"], "token_indices": [0, 1, 3], "init_weights": False},
    ),
    ("Vanilla MLP 1 OSF", "MLP", "OSFConfig", {}),
    ("Vanilla MLP 2 OSF", "MLP", "OSFConfig", {"target_svd_config": {"lin0.weight": 5, "lin1.weight": 1}}),
    ("Vanilla MLP 1 RandLora", "MLP", "RandLoraConfig", {"target_modules": "lin0", "randlora_alpha": 1}),
    ("Vanilla MLP 2 RandLora", "MLP", "RandLoraConfig", {"target_modules": ["lin0"], "randlora_alpha": 1}),
    ("Vanilla MLP 3 RandLora", "MLP", "RandLoraConfig", {"target_modules": ["lin1"], "randlora_alpha": 1}),
    ("Vanilla MLP 4 RandLora", "MLP", "RandLoraConfig", {"target_modules": ["lin0", "lin1"], "randlora_alpha": 1}),
    (
        "Vanilla MLP 5 RandLora", "MLP", "RandLoraConfig",
        {"target_modules": ["lin0", "lin1"], "sparse": True, "randlora_alpha": 1},
    ),
    (
        "Vanilla MLP 6 RandLora", "MLP", "RandLoraConfig",
        {"target_modules": ["lin0", "lin1"], "very_sparse": True, "randlora_alpha": 1},
    ),
    (
        "Vanilla MLP 7 RandLora", "MLP", "RandLoraConfig",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "randlora_alpha": 1},
    ),
    ("Vanilla MLP 1 FRoD", "MLP", "FrodConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 FRoD", "MLP", "FrodConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 FRoD", "MLP", "FrodConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 FRoD", "MLP", "FrodConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 FRoD", "MLP", "FrodConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 1 UniLora", "MLP", "UniLoraConfig", {"target_modules": "lin0", "theta_d_length": 101}),
    ("Vanilla MLP 2 UniLora", "MLP", "UniLoraConfig", {"target_modules": ["lin0"], "theta_d_length": 101}),
    ("Vanilla MLP 3 UniLora", "MLP", "UniLoraConfig", {"target_modules": ["lin1"], "theta_d_length": 101}),
    ("Vanilla MLP 4 UniLora", "MLP", "UniLoraConfig", {"target_modules": ["lin0", "lin1"], "theta_d_length": 101}),
    (
        "Vanilla MLP 5 UniLora", "MLP", "UniLoraConfig",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "theta_d_length": 101},
    ),
    (
        "Embedding + transformers Conv1D 1 UniLora", "EmbConv1D", "UniLoraConfig",
        {"target_modules": ["conv1d"], "theta_d_length": 101},
    ),
    ("Vanilla MLP 1 C3A", "MLP", "C3AConfig", {"block_size": 2, "target_modules": "lin0", "init_weights": True}),
    ("Vanilla MLP 2 C3A", "MLP", "C3AConfig", {"block_size": 2, "target_modules": ["lin0"], "init_weights": True}),
    ("Vanilla MLP 3 C3A", "MLP", "C3AConfig", {"block_size": 2, "target_modules": ["lin1"], "init_weights": True}),
    (
        "Vanilla MLP 5 C3A", "MLP", "C3AConfig",
        {"block_size": 10, "target_modules": ["lin0"], "modules_to_save": ["lin1"], "init_weights": True},
    ),
    (
        "Vanilla MLP 6 C3A", "MLP", "C3AConfig",
        {"block_size": 10, "target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], "init_weights": True},
    ),
    (
        "Vanilla MLP 7 C3A", "MLP", "C3AConfig",
        {
            "block_size_pattern": {"lin0": 5, "lin1": 10},
            "target_modules": ["lin0", "lin1"],
            "modules_to_save": ["lin1"],
            "init_weights": True,
        },
    ),
    *_WAVEFT,
    ("Vanilla MLP 1 RoAd", "MLP", "RoadConfig", {"target_modules": "lin0", "group_size": 2}),
    ("Vanilla MLP 2 RoAd", "MLP", "RoadConfig", {"target_modules": ["lin0"], "group_size": 2}),
    ("Vanilla MLP 3 RoAd", "MLP", "RoadConfig", {"target_modules": ["lin1"], "group_size": 2}),
    ("Vanilla MLP 4 RoAd", "MLP", "RoadConfig", {"target_modules": ["lin0", "lin1"], "group_size": 2}),
    ("Vanilla MLP 5 RoAd", "MLP", "RoadConfig", {"target_modules": ["lin0"], "variant": "road_2", "group_size": 2}),
    ("Vanilla MLP 6 RoAd", "MLP", "RoadConfig", {"target_modules": ["lin0"], "variant": "road_4", "group_size": 2}),
    *_again(_WAVEFT, 2),
    ("Vanilla MLP 1 DeLoRA", "MLP", "DeloraConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 DeLoRA", "MLP", "DeloraConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 DeLoRA", "MLP", "DeloraConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 DeLoRA", "MLP", "DeloraConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 DeLoRA", "MLP", "DeloraConfig", {"target_modules": ["lin0"], "module_dropout": 0.1}),
    (
        "BD-LoRA A only", "MLP", "LoraConfig",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": {"__config__": "BdLoraConfig", "target_modules_bd_a": ["lin0"], "match_strict": False},
        },
    ),
    (
        "BD-LoRA B only", "MLP", "LoraConfig",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": {"__config__": "BdLoraConfig", "target_modules_bd_b": ["lin1"], "nblocks": 2, "match_strict": False},
        },
    ),
    (
        "BD-LoRA both A and B", "MLP", "LoraConfig",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": {"__config__": "BdLoraConfig", "target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2},
        },
    ),
    ("Vanilla MLP 1 PSOFT", "MLP", "PsoftConfig", {"target_modules": "lin0", "r": 4, "psoft_alpha": 4}),
    ("Vanilla MLP 2 PSOFT", "MLP", "PsoftConfig", {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4}),
    ("Vanilla MLP 3 PSOFT", "MLP", "PsoftConfig", {"target_modules": ["lin1"], "r": 2, "psoft_alpha": 2}),
    ("Vanilla MLP 4 PSOFT", "MLP", "PsoftConfig", {"target_modules": ["lin0", "lin1"], "r": 2, "psoft_alpha": 2}),
    (
        "Vanilla MLP 5 PSOFT (modules_to_save)", "MLP", "PsoftConfig",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 4, "psoft_alpha": 4},
    ),
    (
        "Vanilla MLP PSOFT-SO (PSOFT with strict orthogonality)", "MLP", "PsoftConfig",
        {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4, "psoft_mag_a": False, "psoft_mag_b": False},
    ),
    (
        "Vanilla MLP PSOFT lowrank SVD niter 10", "MLP", "PsoftConfig",
        {
            "target_modules": ["lin0"],
            "r": 4,
            "psoft_alpha": 4,
            "psoft_svd": "lowrank",
            "psoft_svd_lowrank_niter": 10,
        },
    ),
    (
        "Vanilla MLP PSOFT Cayley-Neumann approximation term 5", "MLP", "PsoftConfig",
        {
            "target_modules": ["lin0"],
            "r": 4,
            "psoft_alpha": 4,
            "use_cayley_neumann": True,
            "num_cayley_neumann_terms": 5,
            "cayley_neumann_eps": 0.9,
        },
    ),
    (
        "Vanilla MLP PSOFT non-orthogonal R", "MLP", "PsoftConfig",
        {
            "target_modules": ["lin0"],
            "r": 4,
            "psoft_alpha": 4,
            "psoft_orth": False,
            "psoft_mag_a": False,
            "psoft_mag_b": False,
        },
    ),
    (
        "Vanilla MLP PSOFT PiSSA init", "MLP", "PsoftConfig",
        {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4, "ab_svd_init": "pissa_init"},
    ),
    ("Vanilla MLP 1 Lily", "MLP", "LilyConfig", {"target_modules": "lin0", "r": 2, "stride_A": 1, "num_B": 2}),
    ("Vanilla MLP 2 Lily", "MLP", "LilyConfig", {"target_modules": ["lin0"], "r": 2, "stride_A": 1, "num_B": 2}),
    ("Vanilla MLP 3 Lily", "MLP", "LilyConfig", {"target_modules": ["lin1"], "r": 2, "stride_A": 1, "num_B": 2}),
    (
        "Vanilla MLP 4 Lily", "MLP", "LilyConfig",
        {"target_modules": ["lin0", "lin1"], "r": 2, "stride_A": 1, "num_B": 2},
    ),
    ("Vanilla MLP 5 Lily", "MLP", "LilyConfig", {"target_modules": ["lin0"], "r": 4, "stride_A": 1, "num_B": 2}),
    (
        "Vanilla MLP 1 Peanut", "MLP", "PeanutConfig",
        {"target_modules": "lin0", "r": 2, "depth": 0, "act_fn": "relu"},
    ),
    (
        "Vanilla MLP 2 Peanut", "MLP", "PeanutConfig",
        {"target_modules": ["lin0"], "r": 2, "depth": 0, "act_fn": "relu"},
    ),
    (
        "Vanilla MLP 3 Peanut", "MLP", "PeanutConfig",
        {"target_modules": ["lin1"], "r": 2, "depth": 0, "act_fn": "relu"},
    ),
    (
        "Vanilla MLP 4 Peanut", "MLP", "PeanutConfig",
        {"target_modules": ["lin0", "lin1"], "r": 2, "depth": 0, "act_fn": "relu"},
    ),
    (
        "Vanilla MLP 5 Peanut", "MLP", "PeanutConfig",
        {"target_modules": "lin0", "r": 2, "depth": 1, "act_fn": "gelu"},
    ),
    ("Vanilla MLP 1 HiRA", "MLP", "HiraConfig", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 HiRA", "MLP", "HiraConfig", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 HiRA", "MLP", "HiraConfig", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 HiRA", "MLP", "HiraConfig", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 HiRA", "MLP", "HiraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 HiRA", "MLP", "HiraConfig", {"target_modules": ["lin0"], "hira_dropout": 0.1}),
    ("Embedding + transformers Conv1D 1 HiRA", "EmbConv1D", "HiraConfig", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 HiRA", "EmbConv1D", "HiraConfig", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 HiRA", "EmbConv1D", "HiraConfig", {"target_modules": ["emb", "conv1d"]}),
    ("Conv1d HiRA", "Conv1d", "HiraConfig", {"target_modules": ["conv1d"]}),
    ("Conv2d 1 HiRA", "Conv2d", "HiraConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 HiRA", "Conv2d", "HiraConfig", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv3d 1 HiRA", "Conv3d", "HiraConfig", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 HiRA", "Conv3d", "HiraConfig", {"target_modules": ["conv3d", "lin0"]}),
    ("Vanilla MLP 1 Adamss", "MLP", "AdamssConfig", {"target_modules": "lin0", "r": 8}),
    ("Vanilla MLP 2 Adamss", "MLP", "AdamssConfig", {"target_modules": ["lin0"], "r": 8}),
    ("Vanilla MLP 3 Adamss", "MLP", "AdamssConfig", {"target_modules": ["lin1"], "r": 2}),
    ("Vanilla MLP 4 Adamss", "MLP", "AdamssConfig", {"target_modules": ["lin0", "lin1"], "r": 8}),
    (
        "Vanilla MLP 5 Adamss with custom params", "MLP", "AdamssConfig",
        {"target_modules": ["lin0", "lin1"], "r": 8, "num_subspaces": 3, "subspace_rank": 2},
    ),
    (
        "Vanilla MLP 6 Adamss with ASA", "MLP", "AdamssConfig",
        {
            "target_modules": ["lin0", "lin1"],
            "r": 8,
            "num_subspaces": 6,
            "use_asa": True,
            "asa_target_subspaces": 3,
        },
    ),
    (
        "Vanilla MLP 7 Adamss with dynamic rank", "MLP", "AdamssConfig",
        {"target_modules": ["lin0"], "r": 8, "num_subspaces": 3, "use_dynamic_rank": True, "svd_threshold": 0.1},
    ),
    (
        "Vanilla MLP 1 AdaLoRA", "MLP", "AdaLoraConfig",
        {"target_modules": ["lin0"], "init_lora_weights": False, "total_step": 1, "orth_reg_weight": 0},
    ),
    (
        "Vanilla MLP 2 AdaLoRA", "MLP", "AdaLoraConfig",
        {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, "total_step": 1},
    ),
    (
        "Conv2d 1 AdaLoRA", "Conv2d", "AdaLoraConfig",
        {"target_modules": ["conv2d"], "init_lora_weights": False, "total_step": 1},
    ),
    (
        "Conv2d 2 AdaLoRA", "Conv2d", "AdaLoraConfig",
        {"target_modules": ["conv2d", "lin0"], "init_lora_weights": False, "total_step": 1},
    ),
]
