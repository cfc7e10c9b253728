"""The GRAM text templates (METHOD.md sections 2 and 3), with real newlines."""

from __future__ import annotations

JUDGE_INSTRUCTION = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. You should choose the assistant that follows the user's "
    "instructions and answers the user's question better.\n"
    "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, "
    "and level of detail of their responses. Avoid any position biases and ensure that the order in which the "
    "responses were presented does not influence your decision. Do not allow the length of the responses to "
    "influence your evaluation. Do not favor certain names of the assistants. Be as objective as possible.\n"
    "Please directly output your final verdict by strictly following this format: \"A\" if assistant A is "
    "better, \"B\" if assistant B is better.\n\n"
)

QUESTION_HEAD = "[User Question]\n"
A_HEAD = "\n\n[The Start of Assistant A's Answer]\n"
A_TAIL = "\n[The End of Assistant A's Answer]\n\n"
B_HEAD = "[The Start of Assistant B's Answer]\n"
B_TAIL = "\n[The End of Assistant B's Answer]"
VERDICT_CUE = "\n\n#Preferred:"

PRETRAIN_QUESTION_TAIL = "\n\n"
PRETRAIN_A_HEAD = "[The Start of Assistant A's Answer]\n"


def render_judge_prompt(prompt: str, response_a: str, response_b: str) -> str:
    """The stage-2 user message: instruction, question, both answers, then the verdict cue."""
    return (JUDGE_INSTRUCTION + QUESTION_HEAD + prompt + A_HEAD + response_a + A_TAIL + B_HEAD + response_b
            + B_TAIL + VERDICT_CUE)


def render_pretrain_user(prompt: str) -> str:
    """The stage-1 user turn."""
    return QUESTION_HEAD + prompt + PRETRAIN_QUESTION_TAIL


def render_pretrain_target(response_a: str, response_b: str) -> str:
    """The stage-1 assistant target: both answers in their markers."""
    return PRETRAIN_A_HEAD + response_a + A_TAIL + B_HEAD + response_b + B_TAIL
