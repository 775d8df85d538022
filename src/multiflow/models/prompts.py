"""Prompts: the processor's chat template when it has one, else LLaVA-1.5's conversation format.

Used by calibration (Step 2), evaluation, the on-the-fly conversion of original-layout LLaVA checkpoints
(models/loading.py) and the demo model.
"""

from __future__ import annotations

from typing import Any

LLAVA_15_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
# The same conversation as a chat template (processor-side), for checkpoints converted on the fly.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_prompt(processor: Any, question: str, answer: str | None, template: str | None = None) -> str:
    """`template` (a rules file's prompt_template: str.format with {question}) when given, else the processor's
    chat template when it has one, else LLaVA-1.5's; ends at the answer slot unless an answer is given."""
    if template is not None:
        prompt = template.format(question=question)
        return prompt if answer is None else f"{prompt} {answer}"
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answer is None:
            return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return processor.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
    prompt = LLAVA_15_TEMPLATE.format(question=question)
    return prompt if answer is None else f"{prompt} {answer}"
