"""Prompts: the processor's chat template when it has one, else the family's prompt (`Family.prompt`, set as
the processor's chat template by `chat_template` when the model is loaded), else LLaVA-1.5's conversation format.

Used by calibration (Step 2), evaluation, the on-the-fly conversion of original-layout LLaVA checkpoints
(models/loading.py) and the demo model.
"""

from __future__ import annotations

import json
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


def chat_template(prompt: str) -> str:
    """A chat template that writes `prompt` with the user's text in place of `{question}`, and, when the
    conversation holds an answer, a space and the answer after it (as `build_prompt`'s fallback does). A prompt
    that ends `{question}<join>{answer}` ends at the question, and `<join>` goes before the answer instead of the
    space (PaliGemma's `{question}\n{answer}`: its processor writes the prompt's own "\n")."""
    before, sep, after = prompt.partition("{question}")
    if not sep or "{question}" in after or "{answer}" in before + after.removesuffix("{answer}"):
        raise ValueError(f"a family prompt needs one {{question}}, and {{answer}} only at its end: {prompt!r}")
    join = " "
    if after.endswith("{answer}"):
        after, join = "", after.removesuffix("{answer}")
    text = "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    # literal parts as Jinja string expressions: the template engine's trim_blocks cannot eat their newlines
    return ("{% for message in messages %}{% if message['role'] == 'user' %}"
            f"{{{{ {json.dumps(before)} }}}}{text}{{{{ {json.dumps(after)} }}}}"
            f"{{% else %}}{{{{ {json.dumps(join)} }}}}" + text + "{% endif %}{% endfor %}")


def build_prompt(processor: Any, question: str, answer: str | None) -> str:
    """The processor's chat template when it has one, else LLaVA-1.5's; ends at the answer slot
    unless an answer is given."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answer is None:
            return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return processor.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
    prompt = LLAVA_15_TEMPLATE.format(question=question)
    return prompt if answer is None else f"{prompt} {answer}"


def encode_prompts(processor: Any, samples: list, answers: bool = False) -> Any:
    """The processor's batch for image-question samples (calibration and evaluation): each sample's prompt
    (`build_prompt`, with its answer when `answers`) and its image, as one list of images per prompt (Gemma 3's,
    SmolVLM's and Mllama's processors read a flat list as the images of a single prompt)."""
    prompts = [build_prompt(processor, s.question, s.answer if answers else None) for s in samples]
    return processor(images=[[s.image] for s in samples], text=prompts, return_tensors="pt", padding=True)
