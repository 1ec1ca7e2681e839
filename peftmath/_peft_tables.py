"""PEFT 0.21.2's default target modules per architecture (``peft/utils/constants.py``).

Data, not code: used when a config has ``target_modules=None`` and the model type is known (the
``model_type`` of a transformers config.json). ``tests/parity/test_targets_parity.py`` checks these
tables against the installed PEFT."""

from __future__ import annotations

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


def default_targets(peft_type: str) -> dict[str, list[str] | str]:
    """The default-target table of ``peft_type`` (an empty dict for methods without one)."""
    if peft_type in ("LORA", "LOHA", "LOKR", "OFT", "BOFT"):
        return LORA_FAMILY
    if peft_type == "VERA":
        return {**LORA_FAMILY, **VERA_CHANGES}
    return {"ADALORA": ADALORA, "IA3": IA3}.get(peft_type, {})
