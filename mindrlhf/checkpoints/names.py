"""What the tensors of a reward model's checkpoint are called: the backbone, the value head, the LoRA matrices.

The network (model/) names its parameters by these and every file reader and writer recognises them by these;
nothing else spells them.
"""
BACKBONE = "model."  # the Llama backbone, named exactly as in LlamaForCausalLM
VALUE_HEAD = "v_head."  # the scalar head: one (1, hidden) weight, VALUE_HEAD + "weight"
VALUE_HEAD_WEIGHT = VALUE_HEAD + "weight"
LORA_A = "mindpet_delta_lora_a"
LORA_B = "mindpet_delta_lora_b"
STEP = "global_step"  # the optimizer's step, saved beside the weights


def is_lora(name: str) -> bool:
    """A LoRA matrix of the model (not its optimizer moments, adam_m.<name>)."""
    return name.startswith(BACKBONE) and name.endswith((LORA_A, LORA_B))


def trains(name: str) -> bool:
    """What a LoRA reward model trains and its adapter holds: the LoRA matrices and the value head."""
    return is_lora(name) or name.startswith(VALUE_HEAD)
