"""PEFT 0.21.2's default target modules per architecture (``peft/utils/constants.py``).

Data, not code: used when a config has ``target_modules=None`` and the model type is known (the
``model_type`` of a transformers config.json). ``tests/parity/test_targets_parity.py`` checks these
tables against the installed PEFT."""

from __future__ import annotations

from typing import NamedTuple

#: the PEFT release whose math and checkpoint format peftmath reproduces (written as peft_version into the configs
#: peftmath creates; an adapter from a newer PEFT may mean something else where PEFT changed its math)
PEFT_VERSION = "0.21.2"

#: LoRA, LoHa, LoKr, OFT and BOFT share this table
LORA_FAMILY: dict[str, list[str] | str] = {'t5': ['q', 'v'],
 'mt5': ['q', 'v'],
 'bart': ['q_proj', 'v_proj'],
 'gpt2': ['c_attn'],
 'bloom': ['query_key_value'],
 'blip-2': ['q', 'v', 'q_proj', 'v_proj'],
 'opt': ['q_proj', 'v_proj'],
 'gptj': ['q_proj', 'v_proj'],
 'gpt_neox': ['query_key_value'],
 'gpt_neo': ['q_proj', 'v_proj'],
 'bert': ['query', 'value'],
 'roberta': ['query', 'value'],
 'xlm-roberta': ['query', 'value'],
 'electra': ['query', 'value'],
 'deberta-v2': ['query_proj', 'value_proj'],
 'deberta': ['in_proj'],
 'layoutlm': ['query', 'value'],
 'llama': ['q_proj', 'v_proj'],
 'llama4': ['q_proj', 'v_proj'],
 'chatglm': ['query_key_value'],
 'gpt_bigcode': ['c_attn'],
 'mpt': ['Wqkv'],
 'RefinedWebModel': ['query_key_value'],
 'RefinedWeb': ['query_key_value'],
 'falcon': ['query_key_value'],
 'btlm': ['c_proj', 'c_attn'],
 'codegen': ['qkv_proj'],
 'mistral': ['q_proj', 'v_proj'],
 'mixtral': ['q_proj', 'v_proj'],
 'stablelm': ['q_proj', 'v_proj'],
 'phi': ['q_proj', 'v_proj', 'fc1', 'fc2'],
 'gemma': ['q_proj', 'v_proj'],
 'gemma2': ['q_proj', 'v_proj'],
 'gemma3_text': ['q_proj', 'v_proj'],
 'gemma4': '.*language_model\\..*\\.(q_proj|v_proj)',
 'qwen2': ['q_proj', 'v_proj'],
 'qwen3': ['q_proj', 'v_proj'],
 'nemotron_h': ['q_proj', 'k_proj', 'v_proj', 'o_proj'],
 'rwkv': ['key', 'value', 'receptance', 'output'],
 'rwkv7': ['r_proj', 'k_proj', 'v_proj', 'o_proj', 'key', 'value']}

#: VeRA: the LoRA table with these entries replaced
VERA_CHANGES: dict[str, list[str]] = {'phi': ['q_proj', 'v_proj']}

ADALORA: dict[str, list[str]] = {'t5': ['q', 'k', 'v', 'o', 'wi', 'wo'],
 'mt5': ['q', 'k', 'v', 'o', 'wi_0', 'wi_1', 'wo'],
 'bart': ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'],
 'gpt2': ['c_attn'],
 'bloom': ['query_key_value'],
 'opt': ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'],
 'gptj': ['q_proj', 'v_proj'],
 'gpt_neox': ['query_key_value'],
 'gpt_neo': ['q_proj', 'v_proj'],
 'llama': ['q_proj', 'v_proj'],
 'llama4': ['q_proj', 'v_proj'],
 'bert': ['query', 'value'],
 'roberta': ['query', 'key', 'value', 'dense'],
 'deberta-v2': ['query_proj', 'key_proj', 'value_proj', 'dense'],
 'gpt_bigcode': ['c_attn'],
 'deberta': ['in_proj'],
 'gemma': ['q_proj', 'v_proj'],
 'gemma2': ['q_proj', 'v_proj'],
 'gemma3_text': ['q_proj', 'v_proj'],
 'gemma4': '.*language_model\\..*\\.(q_proj|v_proj)',
 'qwen2': ['q_proj', 'v_proj'],
 'qwen3': ['q_proj', 'v_proj'],
 'nemotron_h': ['q_proj', 'k_proj', 'v_proj', 'o_proj']}

IA3: dict[str, list[str]] = {'t5': ['k', 'v', 'wo'],
 'mt5': ['k', 'v', 'wi_1'],
 'gpt2': ['c_attn', 'mlp.c_proj'],
 'bloom': ['query_key_value', 'mlp.dense_4h_to_h'],
 'roberta': ['key', 'value', 'output.dense'],
 'opt': ['q_proj', 'k_proj', 'fc2'],
 'gptj': ['q_proj', 'v_proj', 'fc_out'],
 'gpt_neox': ['query_key_value', 'dense_4h_to_h'],
 'gpt_neo': ['q_proj', 'v_proj', 'c_proj'],
 'bart': ['q_proj', 'v_proj', 'fc2'],
 'gpt_bigcode': ['c_attn', 'mlp.c_proj'],
 'llama': ['k_proj', 'v_proj', 'down_proj'],
 'llama4': ['q_proj', 'v_proj', 'down_proj'],
 'mistral': ['k_proj', 'v_proj', 'down_proj'],
 'mixtral': ['k_proj', 'v_proj', 'w2'],
 'bert': ['key', 'value', 'output.dense'],
 'deberta-v2': ['key_proj', 'value_proj', 'output.dense'],
 'deberta': ['in_proj', 'output.dense'],
 'RefinedWebModel': ['query_key_value', 'dense_4h_to_h'],
 'RefinedWeb': ['query_key_value', 'dense_4h_to_h'],
 'falcon': ['query_key_value', 'dense_4h_to_h'],
 'phi': ['q_proj', 'v_proj', 'fc2'],
 'gemma': ['q_proj', 'v_proj', 'down_proj'],
 'gemma2': ['q_proj', 'v_proj', 'down_proj'],
 'gemma3_text': ['q_proj', 'v_proj', 'down_proj'],
 'qwen2': ['q_proj', 'v_proj', 'down_proj'],
 'qwen3': ['q_proj', 'v_proj', 'down_proj']}

IA3_FEEDFORWARD: dict[str, list[str]] = {'t5': ['wo'],
 'mt5': [],
 'gpt2': ['mlp.c_proj'],
 'bloom': ['mlp.dense_4h_to_h'],
 'roberta': ['output.dense'],
 'opt': ['fc2'],
 'gptj': ['fc_out'],
 'gpt_neox': ['dense_4h_to_h'],
 'gpt_neo': ['c_proj'],
 'bart': ['fc2'],
 'gpt_bigcode': ['mlp.c_proj'],
 'llama': ['down_proj'],
 'llama4': ['down_proj'],
 'mistral': ['down_proj'],
 'mixtral': ['w2'],
 'bert': ['output.dense'],
 'deberta-v2': ['output.dense'],
 'deberta': ['output.dense'],
 'RefinedWeb': ['dense_4h_to_h'],
 'RefinedWebModel': ['dense_4h_to_h'],
 'falcon': ['dense_4h_to_h'],
 'phi': ['fc2'],
 'gemma': ['down_proj'],
 'gemma2': ['down_proj'],
 'gemma3_text': ['down_proj'],
 'qwen2': ['down_proj'],
 'qwen3': ['down_proj']}


#: PEFT types whose default-target table is LoRA's
#: (PEFT 0.21.2's TRANSFORMERS_MODELS_TO_<TYPE>_TARGET_MODULES_MAPPING)
LORA_TABLE_TYPES = frozenset({
    'BOFT', 'DEFT', 'DELORA', 'GLORA', 'GRALORA', 'HIRA', 'HRA', 'LILY',
    'LOHA', 'LOKR', 'LORA', 'MISS', 'OFT', 'PEANUT', 'POLY', 'PSOFT',
    'RANDLORA', 'ROAD', 'SUPERTUNING', 'TINYLORA', 'UNILORA',
})
#: the other tables as changes to LoRA's: peft_type -> ({model_type: targets, added or changed}, removed model types)
TABLE_CHANGES: dict[str, tuple[dict[str, list[str] | str], tuple[str, ...]]] = {
 'ADAMSS': ({'vit': ['query', 'value']}, ()),
 'BEFT': ({'bart': ['v_proj'],
           'bert': ['value'],
           'deberta-v2': ['value_proj'],
           'gemma': ['v_proj'],
           'gemma2': ['v_proj'],
           'gemma3_text': ['v_proj'],
           'gpt_neo': ['v_proj'],
           'gptj': ['v_proj'],
           'llama': ['v_proj'],
           'llama4': ['v_proj'],
           'mistral': ['v_proj'],
           'mixtral': ['v_proj'],
           'mt5': ['v'],
           'opt': ['v_proj'],
           'phi': ['v_proj'],
           'qwen2': ['v_proj'],
           'qwen3': ['v_proj'],
           'roberta': ['value'],
           't5': ['v']},
          ('gpt2', 'bloom', 'blip-2', 'gpt_neox', 'xlm-roberta', 'electra', 'deberta', 'layoutlm', 'chatglm',
           'gpt_bigcode', 'mpt', 'RefinedWebModel', 'RefinedWeb', 'falcon', 'btlm', 'codegen', 'stablelm', 'gemma4',
           'nemotron_h', 'rwkv', 'rwkv7')),
 'C3A': ({'gpt2': ['mlp.c_proj'], 'gpt_bigcode': ['mlp.c_proj']}, ()),
 'FOURIERFT': ({'gpt2': ['mlp.c_proj'], 'gpt_bigcode': ['mlp.c_proj']}, ()),
 'FROD': ({'phi': ['q_proj', 'v_proj'], 'vit': ['query', 'value']}, ()),
 'LN_TUNING': ({'bart': ['self_attn_layer_norm', 'encoder_attn_layer_norm', 'final_layer_norm'],
                'blip-2': ['layernorm', 'LayerNorm', 'final_layer_norm', 'self_attn_layer_norm'],
                'bloom': ['input_layernorm', 'post_attention_layernorm', 'ln_f'],
                'falcon': ['input_layernorm', 'post_attention_layernorm', 'ln_f'],
                'gemma': ['input_layernorm', 'post_attention_layernorm', 'norm'],
                'gemma2': ['input_layernorm', 'post_attention_layernorm', 'pre_feedforward_layernorm',
                           'post_feedforward_layernorm', 'norm'],
                'gemma3_text': ['input_layernorm', 'post_attention_layernorm', 'pre_feedforward_layernorm',
                                'post_feedforward_layernorm', 'norm'],
                'gpt2': ['ln_1', 'ln_2', 'ln_f'],
                'gptj': ['ln_1', 'ln_f'],
                'llama': ['input_layernorm', 'post_attention_layernorm', 'norm'],
                'llava': ['multi_modal_projector', 'input_layernorm', 'post_attention_layernorm', 'norm',
                          'embed_tokens', 'lm_head'],
                'mistral': ['input_layernorm', 'post_attention_layernorm', 'norm'],
                'mt5': ['layer_norm', 'final_layer_norm'],
                'phi': ['input_layernorm', 'final_layernorm'],
                'qwen2': ['post_attention_layernorm'],
                'qwen3': ['post_attention_layernorm'],
                't5': ['layer_norm', 'final_layer_norm']},
               ('opt', 'gpt_neox', 'gpt_neo', 'bert', 'roberta', 'xlm-roberta', 'electra', 'deberta-v2', 'deberta',
                'layoutlm', 'llama4', 'chatglm', 'gpt_bigcode', 'mpt', 'RefinedWebModel', 'RefinedWeb', 'btlm',
                'codegen', 'mixtral', 'stablelm', 'gemma4', 'nemotron_h', 'rwkv', 'rwkv7')),
 'OSF': ({'bloom': ['query_key_value', 'dense_4h_to_h'],
          'falcon': ['query_key_value', 'dense_4h_to_h'],
          'gemma': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj'],
          'gemma2': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj'],
          'gemma3_text': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj'],
          'gpt2': ['c_attn', 'c_proj'],
          'gpt_bigcode': ['c_attn', 'c_proj'],
          'gpt_neox': ['query_key_value', 'dense_4h_to_h'],
          'gptj': ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc_in', 'fc_out'],
          'llama': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj'],
          'llama4': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj'],
          'mistral': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj'],
          'mixtral': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj'],
          'opt': ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'],
          'phi': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj'],
          'qwen2': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj'],
          'qwen3': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj']},
         ('t5', 'mt5', 'bart', 'blip-2', 'gpt_neo', 'bert', 'roberta', 'xlm-roberta', 'electra', 'deberta-v2',
          'deberta', 'layoutlm', 'chatglm', 'mpt', 'RefinedWebModel', 'RefinedWeb', 'btlm', 'codegen', 'stablelm',
          'gemma4', 'nemotron_h', 'rwkv', 'rwkv7')),
 'PVERA': ({'dinov2': ['query', 'value'], 'phi': ['q_proj', 'v_proj']}, ()),
 'SHADOW': ({},
            ('t5', 'mt5', 'bart', 'gpt2', 'bloom', 'blip-2', 'opt', 'gptj', 'gpt_neox', 'gpt_neo', 'bert',
             'roberta', 'xlm-roberta', 'electra', 'deberta-v2', 'deberta', 'layoutlm', 'llama', 'llama4', 'chatglm',
             'gpt_bigcode', 'mpt', 'RefinedWebModel', 'RefinedWeb', 'falcon', 'btlm', 'codegen', 'mistral',
             'mixtral', 'stablelm', 'phi', 'gemma', 'gemma2', 'gemma3_text', 'gemma4', 'qwen2', 'qwen3',
             'nemotron_h', 'rwkv', 'rwkv7')),
 'SHIRA': ({'phi': ['q_proj', 'v_proj']}, ()),
 'VBLORA': ({'bart': ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'],
             'deberta-v2': ['query_proj', 'key_proj', 'value_proj', 'dense'],
             'mt5': ['q', 'k', 'v', 'o', 'wi_0', 'wi_1', 'wo'],
             'opt': ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'],
             't5': ['q', 'k', 'v', 'o', 'wi', 'wo']},
            ('blip-2', 'xlm-roberta', 'electra', 'layoutlm', 'chatglm', 'mpt', 'RefinedWebModel', 'RefinedWeb',
             'falcon', 'btlm', 'codegen', 'mistral', 'mixtral', 'stablelm', 'phi', 'rwkv', 'rwkv7')),
 'WAVEFT': ({'gpt2': ['mlp.c_proj'], 'gpt_bigcode': ['mlp.c_proj']}, ('btlm', 'rwkv', 'rwkv7'))}


def default_targets(peft_type: str) -> dict[str, list[str] | str]:
    """The default-target table of ``peft_type`` (an empty dict for methods without one): PEFT 0.21.2's
    table for that type, LoRA's with :data:`TABLE_CHANGES` applied where it differs."""
    if peft_type in LORA_TABLE_TYPES:
        return LORA_FAMILY
    if peft_type == "VERA":
        return {**LORA_FAMILY, **VERA_CHANGES}
    if peft_type in TABLE_CHANGES:
        changes, removed = TABLE_CHANGES[peft_type]
        return {**{k: v for k, v in LORA_FAMILY.items() if k not in removed}, **changes}
    return {"ADALORA": ADALORA, "IA3": IA3}.get(peft_type, {})


# --------------------------------------------------------------------------------------------------
# What every field of PEFT 0.21.2's config dataclasses means to peftmath
# --------------------------------------------------------------------------------------------------
#: the field changes nothing peftmath computes from a checkpoint or the field's math is implemented
IMPLEMENTED = "implemented"
#: bookkeeping, training-only (dropouts, the AdaLoRA allocator) or the initialisation of tensors the
#: checkpoint holds: no effect on merge, unmerge or forward
IRRELEVANT = "irrelevant"


class Refused(NamedTuple):
    """A field that changes the math and that peftmath does not implement: refused (UnsupportedError)
    when its value is not one of ``allowed`` (PEFT's default first). ``variant`` names the PEFT 0.21.2
    variant it switches on, ``why`` says what it would change."""

    variant: str
    allowed: tuple
    why: str

    def allows(self, value: object) -> bool:
        return any(value is a or (type(value) is type(a) and value == a) for a in self.allowed)


_BOOKKEEPING = dict.fromkeys(("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                              "revision", "inference_mode"), IRRELEVANT)
_TARGETS = dict.fromkeys(("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform",
                          "layers_pattern"), IMPLEMENTED)
_NONE = (None,)

#: LoRA's fields (AdaLoRA inherits them)
_LORA_FIELDS: dict[str, object] = {
    **_BOOKKEEPING, **_TARGETS,
    **dict.fromkeys(("r", "lora_alpha", "fan_in_fan_out", "bias", "use_rslora", "rank_pattern", "alpha_pattern",
                     "use_dora", "lora_bias"), IMPLEMENTED),
    # training-only / settings of initialisations whose result the checkpoint holds
    **dict.fromkeys(("lora_dropout", "megatron_core", "loftq_config", "eva_config", "corda_config",
                     "lora_ga_config", "qalora_group_size", "runtime_config"), IRRELEVANT),
    # BD-LoRA: block-diagonal lora_A or lora_B; VeLoRA / MonteCLoRA: training-time state (eval forward and merge
    # are plain LoRA's); KaSA: the base's r smallest singular components dropped, lora_diag between B and A.
    # Their tensors are checked and kept (methods/lora.py, "Variants")
    **dict.fromkeys(("use_bdlora", "velora_config", "monteclora_config", "kasa_config"), IMPLEMENTED),
    # aLoRA: forward with alora_offsets (the adapter acts from the invocation sequence on); merges refused, as PEFT
    "alora_invocation_tokens": IMPLEMENTED,
    "init_lora_weights": Refused(
        "PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA initialisation", (True, False, "gaussian", "eva", "orthogonal", "mica"),
        "PEFT runs this initialisation again when it loads the adapter, and it changes the base weights "
        "(W <- W - s*B0*A0, or a quantised W); peftmath merges into the base as given. If your base already is "
        "the initialised (residual) model, set init_lora_weights to true in adapter_config.json; PEFT's "
        "save_pretrained(..., path_initial_model_for_weight_conversion=...) converts such an adapter into a plain "
        "LoRA of the original base"),
    "megatron_config": Refused("Megatron tensor-parallel LoRA", _NONE,
                               "its layers are Megatron's parallel linears, saved per rank"),
    # trainable tokens: rows of the embedding replaced beside LoRA (methods/_lora_tokens.py)
    "trainable_token_indices": IMPLEMENTED,
    "use_qalora": Refused("QALoRA", (False,), "lora_A acts on the input pooled in groups of qalora_group_size"),
    "layer_replication": Refused("layer replication", _NONE,
                                 "it stacks copies of base layers (a deeper model, num_hidden_layers changes), so the "
                                 "adapted modules are layers of that model, not of the base; "
                                 "peftmath.methods.lora_replication.load_replicated(folder, base_state) gives the "
                                 "replicated base and the adapter for it (API only; create_adapter / peftmath init "
                                 "build such adapters; specs/lora.md, section 12)"),
    # LoRA on raw nn.Parameter tensors (mixture-of-experts weights): methods/lora_params.py
    "target_parameters": IMPLEMENTED,
    "arrow_config": Refused("Arrow routing", _NONE, "it routes each token among several LoRA experts"),
    "ensure_weight_tying": Refused("tied adapters (ensure_weight_tying)", (False,),
                                   "PEFT ties an adapter on the output layer to the embedding's"),
}

#: LoRA variants AdaLoRA's SVD layers do not run (PEFT's AdaLoraConfig inherits the fields)
_NOT_FOR_ADALORA = {
    "use_bdlora": Refused("BD-LoRA (block-diagonal LoRA)", _NONE, "AdaLoRA's SVD layers have no block-diagonal factor"),
    "velora_config": Refused("VeLoRA", _NONE, "AdaLoRA's SVD layers do not run VeLoRA"),
    "monteclora_config": Refused("MonteCLoRA", _NONE, "AdaLoRA's SVD layers do not run MonteCLoRA"),
    "kasa_config": Refused("KaSA", _NONE, "AdaLoRA's SVD layers do not run KaSA"),
    "alora_invocation_tokens": Refused("aLoRA (activated LoRA)", _NONE, "AdaLoRA's SVD layers do not run aLoRA"),
    "trainable_token_indices": Refused("trainable tokens (trainable_token_indices) with AdaLoRA", _NONE,
                                       "it trains rows of the token embedding (token_adapter.trainable_tokens_delta); "
                                       "peftmath reads them with LoRA adapters only"),
}

#: peft_type -> {field: IMPLEMENTED | IRRELEVANT | Refused(...)} for every field of PEFT 0.21.2's config
#: dataclass of that method (``tests/parity/test_refusals_parity.py`` checks it covers them all)
CONFIG_FIELDS: dict[str, dict[str, object]] = {
    "LORA": _LORA_FIELDS,
    # AdaLoRA's layers read init_lora_weights as a flag only (any true value: the default init)
    "ADALORA": {**_LORA_FIELDS, "rank_pattern": IMPLEMENTED, "init_lora_weights": IRRELEVANT, **_NOT_FOR_ADALORA,
                **dict.fromkeys(("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                                 "orth_reg_weight", "total_step"), IRRELEVANT)},
    "IA3": {**_BOOKKEEPING, **dict.fromkeys(("target_modules", "exclude_modules", "modules_to_save"), IMPLEMENTED),
            "feedforward_modules": IMPLEMENTED, "fan_in_fan_out": IMPLEMENTED, "init_ia3_weights": IRRELEVANT},
    "LOHA": {**_BOOKKEEPING, **_TARGETS,
             **dict.fromkeys(("rank_pattern", "alpha_pattern", "r", "alpha", "use_effective_conv2d"), IMPLEMENTED),
             **dict.fromkeys(("rank_dropout", "module_dropout", "init_weights"), IRRELEVANT)},
    "LOKR": {**_BOOKKEEPING, **_TARGETS,
             **dict.fromkeys(("rank_pattern", "alpha_pattern", "r", "alpha", "use_effective_conv2d", "decompose_both",
                              "decompose_factor"), IMPLEMENTED),
             **dict.fromkeys(("rank_dropout", "module_dropout", "rank_dropout_scale", "init_weights"), IRRELEVANT)},
    "OFT": {**_BOOKKEEPING, **_TARGETS,
            **dict.fromkeys(("r", "oft_block_size", "fan_in_fan_out", "bias", "coft", "eps", "block_share",
                             "use_cayley_neumann", "num_cayley_neumann_terms"), IMPLEMENTED),
            **dict.fromkeys(("module_dropout", "init_weights"), IRRELEVANT)},
    "BOFT": {**_BOOKKEEPING, **_TARGETS,
             **dict.fromkeys(("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "fan_in_fan_out",
                              "bias"), IMPLEMENTED),
             **dict.fromkeys(("boft_dropout", "init_weights"), IRRELEVANT)},
    # projection_prng_key only regenerates projections a checkpoint did not save, which peftmath refuses
    # (VeRA's validate_checkpoint: vera_A / vera_B must be in the checkpoint)
    "VERA": {**_BOOKKEEPING, **{k: v for k, v in _TARGETS.items() if k != "exclude_modules"},
             **dict.fromkeys(("r", "save_projection", "fan_in_fan_out", "bias"), IMPLEMENTED),
             **dict.fromkeys(("projection_prng_key", "vera_dropout", "d_initial", "init_weights"), IRRELEVANT)},
    "HRA": {**_BOOKKEEPING, **_TARGETS, **dict.fromkeys(("r", "apply_GS", "bias"), IMPLEMENTED),
            "init_weights": IRRELEVANT},
    "ROAD": {**_BOOKKEEPING,
             **dict.fromkeys(("target_modules", "modules_to_save", "variant", "group_size"), IMPLEMENTED),
             "init_weights": IRRELEVANT},
    "FOURIERFT": {**_BOOKKEEPING, **_TARGETS,
                  **dict.fromkeys(("n_frequency", "scaling", "random_loc_seed", "fan_in_fan_out", "bias",
                                   "n_frequency_pattern"), IMPLEMENTED),
                  "init_weights": IRRELEVANT},
    # HiRA: PEFT 0.21.2 creates new modules with rank r whatever rank_pattern says; the tensors hold the rank
    "HIRA": {**_BOOKKEEPING, **_TARGETS, **dict.fromkeys(("r", "fan_in_fan_out"), IMPLEMENTED),
             **dict.fromkeys(("hira_dropout", "init_weights", "rank_pattern"), IRRELEVANT)},
    "MISS": {**_BOOKKEEPING, **_TARGETS, **dict.fromkeys(("r", "mini_r", "init_weights", "bias"), IMPLEMENTED),
             "miss_dropout": IRRELEVANT},
    # DeLoRA: delora_lambda / lambda_pattern only set the initial λ, which the checkpoint holds
    "DELORA": {**_BOOKKEEPING, **_TARGETS, **dict.fromkeys(("r", "rank_pattern", "bias"), IMPLEMENTED),
               **dict.fromkeys(("delora_lambda", "lambda_pattern", "module_dropout", "init_weights"), IRRELEVANT)},
    # VB-LoRA: the init fields only draw tensors the checkpoint holds; both saved forms are read
    "VBLORA": {**_BOOKKEEPING, **_TARGETS,
               **dict.fromkeys(("r", "num_vectors", "vector_length", "topk", "save_only_topk_weights",
                                "fan_in_fan_out", "bias"), IMPLEMENTED),
               **dict.fromkeys(("vblora_dropout", "init_vector_bank_bound", "init_logits_std"), IRRELEVANT)},
    # RandLoRA: sparse / very_sparse / projection_prng_key only draw bases the checkpoint holds (refused without)
    "RANDLORA": {**_BOOKKEEPING, **{k: v for k, v in _TARGETS.items() if k != "exclude_modules"},
                 **dict.fromkeys(("r", "save_projection", "randlora_alpha", "fan_in_fan_out", "bias"), IMPLEMENTED),
                 **dict.fromkeys(("projection_prng_key", "sparse", "very_sparse", "randlora_dropout", "init_weights"),
                                 IRRELEVANT)},
    # C3A: init_weights only draws the kernel the checkpoint holds; PEFT's C3AConfig has no exclude_modules
    "C3A": {**_BOOKKEEPING, **{k: v for k, v in _TARGETS.items() if k != "exclude_modules"},
            **dict.fromkeys(("block_size", "block_size_pattern", "bias"), IMPLEMENTED), "init_weights": IRRELEVANT},
    # SHiRA: the positions are saved, so mask_type / random_seed only chose them; no exclude_modules etc. in PEFT
    "SHIRA": {**_BOOKKEEPING, **dict.fromkeys(("target_modules", "modules_to_save", "r", "fan_in_fan_out"), IMPLEMENTED),
              **dict.fromkeys(("mask_type", "random_seed", "init_weights"), IRRELEVANT)},
    # WaveFT: proportional_parameters only sized the spectra the checkpoint holds (k = the spectrum's length)
    "WAVEFT": {**_BOOKKEEPING, **_TARGETS,
               **dict.fromkeys(("n_frequency", "scaling", "wavelet_family", "use_idwt", "random_loc_seed",
                                "fan_in_fan_out", "bias", "n_frequency_pattern"), IMPLEMENTED),
               **dict.fromkeys(("proportional_parameters", "init_weights"), IRRELEVANT)},
    # OSF: the ranks are read from the saved factors; target_svd_config is ignored by PEFT too
    "OSF": {**_BOOKKEEPING, **dict.fromkeys(("target_modules", "modules_to_save"), IMPLEMENTED),
            **dict.fromkeys(("effective_rank", "rank_pattern", "init_weights", "target_svd_config"), IRRELEVANT)},
    # GraLoRA: init_weights only drew the tensors the checkpoint holds; no exclude_modules in PEFT's config
    "GRALORA": {**_BOOKKEEPING, **{k: v for k, v in _TARGETS.items() if k != "exclude_modules"},
                **dict.fromkeys(("r", "hybrid_r", "alpha", "gralora_k", "fan_in_fan_out", "bias"), IMPLEMENTED),
                **dict.fromkeys(("gralora_dropout", "init_weights"), IRRELEVANT)},
    # PVeRA: projection_prng_key only regenerates projections a checkpoint did not save (refused);
    # generator_seed only seeds the sampling of sample_at_inference (peftmath's forward takes the noise)
    "PVERA": {**_BOOKKEEPING, **{k: v for k, v in _TARGETS.items() if k != "exclude_modules"},
              **dict.fromkeys(("r", "save_projection", "fan_in_fan_out", "bias", "sample_at_inference"), IMPLEMENTED),
              **dict.fromkeys(("projection_prng_key", "pvera_dropout", "d_initial", "init_weights", "generator_seed"),
                              IRRELEVANT)},
    # FRoD: the shared V / S positions are read from the checkpoint (refused without: PEFT recomputes them from the
    # base weights and its torch generator), so the fields that build them only matter at initialisation
    "FROD": {**_BOOKKEEPING, **{k: v for k, v in _TARGETS.items() if k != "exclude_modules"},
             **dict.fromkeys(("save_projection", "fan_in_fan_out", "bias"), IMPLEMENTED),
             **dict.fromkeys(("projection_prng_key", "frod_dropout", "init_weights", "sparse_rate",
                              "regularization_alpha", "progressbar", "runtime_offload_base_weight"), IRRELEVANT)},
    # GLoRA: the support forms are read from the saved tensors; init_weights only drew them
    "GLORA": {**_BOOKKEEPING, **dict.fromkeys(("target_modules", "modules_to_save", "r", "bias", "config_A_B",
                                               "config_C", "config_D_E"), IMPLEMENTED), "init_weights": IRRELEVANT},
    # PSOFT: fan_in_fan_out has no effect (PEFT adapts nn.Linear only); init_weights only drew R
    "PSOFT": {**_BOOKKEEPING, **_TARGETS,
              **dict.fromkeys(("r", "psoft_alpha", "ab_svd_init", "psoft_svd", "psoft_svd_lowrank_niter", "random_seed",
                               "psoft_orth", "psoft_mag_b", "psoft_mag_a", "use_cayley_neumann",
                               "num_cayley_neumann_terms", "cayley_neumann_eps"), IMPLEMENTED),
              **dict.fromkeys(("psoft_dropout", "fan_in_fan_out", "init_weights"), IRRELEVANT)},
    # DEFT: init_weights / init_scale only drew R, which the checkpoint holds (the rank is read from deft_P)
    "DEFT": {**_BOOKKEEPING, **_TARGETS,
             **dict.fromkeys(("r", "decomposition_method", "alpha", "para", "fan_in_fan_out", "bias"), IMPLEMENTED),
             **dict.fromkeys(("init_scale", "deft_dropout", "init_weights"), IRRELEVANT)},
    # Super-tuning: sparsity / select_top choose the positions (saved, or recomputed from W's magnitudes)
    "SUPERTUNING": {**_BOOKKEEPING, **dict.fromkeys(("target_modules", "modules_to_save", "sparsity", "select_top",
                                                     "r", "lora_alpha", "save_precomputed_indices"), IMPLEMENTED),
                    **dict.fromkeys(("lora_dropout", "init_weights"), IRRELEVANT)},
    # BEFT: init_weights only drew the vector the checkpoint holds; no exclude_modules etc. in PEFT
    "BEFT": {**_BOOKKEEPING, **dict.fromkeys(("target_modules", "modules_to_save"), IMPLEMENTED),
             "init_weights": IRRELEVANT},
    # trainable tokens: init_weights only drew the rows the checkpoint holds; token_indices are the rows replaced
    "TRAINABLE_TOKENS": {**_BOOKKEEPING, **dict.fromkeys(("target_modules", "token_indices"), IMPLEMENTED),
                         "init_weights": IRRELEVANT},
    # Lily: stride_A gives the ties (the checkpoint holds a copy per module); init_weights only drew the tensors
    "LILY": {**_BOOKKEEPING, **_TARGETS, **dict.fromkeys(("r", "stride_A", "num_B", "scaling"), IMPLEMENTED),
             "init_weights": IRRELEVANT},
    # PEANuT: init_weights only drew the tensors the checkpoint holds
    "PEANUT": {**_BOOKKEEPING, **_TARGETS, **dict.fromkeys(("r", "depth", "act_fn", "scaling"), IMPLEMENTED),
               "init_weights": IRRELEVANT},
    # LN tuning: the checkpoint holds the trained copies; PEFT's LNTuningConfig has no layers_* fields
    "LN_TUNING": {**_BOOKKEEPING, **dict.fromkeys(("target_modules", "exclude_modules", "modules_to_save"), IMPLEMENTED)},
    # TinyLoRA: projection_seed finds each module's place (its group) from the saved P; init fields only draw v
    "TINYLORA": {**_BOOKKEEPING, **{k: v for k, v in _TARGETS.items() if k != "exclude_modules"},
                 **dict.fromkeys(("r", "u", "weight_tying", "projection_seed", "save_projection", "fan_in_fan_out",
                                  "bias"), IMPLEMENTED),
                 **dict.fromkeys(("init_v_bound", "tinylora_dropout", "init_weights"), IRRELEVANT)},
    # UniLoRA: proj_seed only drew the indices a save_indices=True checkpoint holds (refused without them)
    "UNILORA": {**_BOOKKEEPING, **{k: v for k, v in _TARGETS.items() if k != "exclude_modules"},
                **dict.fromkeys(("r", "theta_d_length", "save_indices", "fan_in_fan_out", "bias"), IMPLEMENTED),
                **dict.fromkeys(("proj_seed", "unilora_dropout", "init_theta_d_bound", "init_weights"), IRRELEVANT)},
    # AdaMSS: the subspaces are recomputed from the base weight with PEFT's k-means; the ASA fields only steer
    # training; r, subspace_rank, init_weights, use_dynamic_rank, svd_threshold and random_seed only build tensors
    # the checkpoint holds
    "ADAMSS": {**_BOOKKEEPING, **{k: v for k, v in _TARGETS.items() if k != "exclude_modules"},
               "num_subspaces": IMPLEMENTED,
               **dict.fromkeys(("r", "subspace_rank", "init_weights", "use_asa", "asa_target_subspaces", "init_warmup",
                                "final_warmup", "mask_interval", "asa_importance_beta", "asa_uncertainty_beta",
                                "asa_schedule_exponent", "use_dynamic_rank", "svd_threshold", "random_seed"),
                               IRRELEVANT)},
    # X-LoRA: the classifier's settings (its forward), the experts' folders; dropout and the scaling pass value
    # serve training / the first pass only where stated in specs/xlora.md
    "XLORA": {**_BOOKKEEPING, **dict.fromkeys(("hidden_size", "adapters", "enable_softmax", "enable_softmax_topk",
                                               "layerwise_scalings", "xlora_depth", "xlora_size", "softmax_temperature",
                                               "top_k_lora", "scaling_pass_value", "global_scaling_weight"), IMPLEMENTED),
              **dict.fromkeys(("xlora_dropout_p", "use_trainable_adapters"), IRRELEVANT)},
    # Poly: init_weights only drew the tensors the checkpoint holds; PolyConfig has no layers_* fields
    "POLY": {**_BOOKKEEPING, **dict.fromkeys(("target_modules", "exclude_modules", "modules_to_save", "r", "poly_type",
                                              "n_tasks", "n_skills", "n_splits"), IMPLEMENTED), "init_weights": IRRELEVANT},
    "PROMPT_TUNING": {**_BOOKKEEPING, "modules_to_save": IMPLEMENTED,
                      **dict.fromkeys(("num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                       "num_attention_heads", "num_layers"), IMPLEMENTED),
                      **dict.fromkeys(("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                       "tokenizer_kwargs"), IRRELEVANT)},
    "P_TUNING": {**_BOOKKEEPING, "modules_to_save": IMPLEMENTED,
                 **dict.fromkeys(("num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                  "num_attention_heads", "num_layers", "encoder_reparameterization_type",
                                  "encoder_hidden_size", "encoder_num_layers"), IMPLEMENTED),
                 "encoder_dropout": IRRELEVANT},
    "PREFIX_TUNING": {**_BOOKKEEPING, "modules_to_save": IMPLEMENTED,
                      **dict.fromkeys(("num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                       "num_attention_heads", "num_layers", "encoder_hidden_size",
                                       "prefix_projection"), IMPLEMENTED),
                      "init_weights": IRRELEVANT},
    "CARTRIDGE": {**_BOOKKEEPING, **dict.fromkeys(("modules_to_save", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers", "num_frozen_tokens"), IMPLEMENTED)},  # noqa: E501
    "MULTITASK_PROMPT_TUNING": {**_BOOKKEEPING, **dict.fromkeys(("modules_to_save", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers", "num_ranks", "num_tasks"), IMPLEMENTED), **dict.fromkeys(("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs", "prompt_tuning_init_state_dict_path", "prompt_tuning_init_task"), IRRELEVANT)},  # noqa: E501
    "CPT": {**_BOOKKEEPING, **dict.fromkeys(("modules_to_save", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers", "cpt_token_ids", "cpt_tokens_type_mask", "opt_weighted_loss_type", "opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon"), IMPLEMENTED), **dict.fromkeys(("cpt_mask", "tokenizer_name_or_path"), IRRELEVANT)},  # noqa: E501
    "ADAPTION_PROMPT": {**_BOOKKEEPING, **dict.fromkeys(("target_modules", "adapter_len", "adapter_layers"), IMPLEMENTED)},
    "SHADOW": {**_BOOKKEEPING, **_TARGETS, **dict.fromkeys(("r", "shadow_alpha", "update_hidden_size", "shadow_model", "shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads", "shadow_intermediate_size", "share_embeddings"), IMPLEMENTED), **dict.fromkeys(("shadow_dropout", "init_weights", "auxiliary_loss_weight"), IRRELEVANT)},  # noqa: E501
}

#: what tensors of unsupported PEFT variants look like in a checkpoint (a regex on the key without
#: ``base_model.model.``, and what it is), for the error that lists the tensors a load does not understand
UNKNOWN_TENSORS: list[tuple[str, str]] = [
    (r"(^|\.)lora_diag$", "KaSA's lora_diag (kasa_config)"),
    (r"(^|\.)token_adapter\.trainable_tokens_delta$", "trainable tokens (trainable_token_indices; peftmath reads "
                                                      "them in LoRA adapters)"),
    (r"(^|\.)lora_velora_", "VeLoRA state (velora_config)"),
    (r"(^|\.)lora_monteclora_sampler\.", "MonteCLoRA's sampler (monteclora_config)"),
    (r"(^|\.)base_layer\..*\.lora_", "a LoRA inside a wrapped layer (PEFT nests one only in an adapted "
                                     "nn.MultiheadAttention X, as X.base_layer.out_proj, which peftmath reads)"),
    (r"(^|\.)lora_arrow", "Arrow routing state (arrow_config)"),
    (r"(^|\.)(lora|hada|lokr|oft|boft|vera|ia3)_", "a tensor named like an adapter parameter of another method "
                                                   "or variant"),
]
