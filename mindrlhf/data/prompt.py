"""The one prompt template (the MindRecord's columns are in mindrlhf.data.records).

Conversion, evaluation and inference all format text here, so training and scoring never drift apart
(the upstream inference script used '根据一下' while training used '根据以下').
"""

PROMPT_TEMPLATE = "根据以下问题，写一个合适的回答。\n\n### 问题：\n{instruction}\n\n### 回答：\n{response}"


def format_prompt(instruction: str, response: str) -> str:
    """prompt + response in the training template; inputs are stripped as the tutorial does."""
    return PROMPT_TEMPLATE.format_map({"instruction": instruction.strip(), "response": response.strip()})
