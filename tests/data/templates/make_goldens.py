"""Regenerates transformers-goldens.json; run with transformers 5.23.0 installed (not a stacklock dependency)."""

import json
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
GEN = "{%- for m in messages -%}\n  {%- if m.role == 'assistant' -%}\n    {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}\n  {%- else -%}\n    [{{ m.role }}] {{ m.content }}\n  {%- endif %}\n  {%- if loop.index >= 3 %}{% break %}{% endif %}\n{% endfor -%}"
TOJSON = "{{ tools | tojson }}\n{{ tools[0] | tojson(indent=2) }}\n{{ tools[0] | tojson(sort_keys=true, separators=(',', ':')) }}\n{{ messages[0] | tojson }}|{{ unk_token }}|{{ enable_thinking }}"
gemma = (Path(__file__).parents[3] / "registry/templates/gemma3-it.jinja").read_text(encoding="utf-8")
msgs = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  Hello <b> & 'friends'  "},
    {"role": "assistant", "content": "Hi!"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "look "}, {"type": "image"}, {"type": "text", "text": " here"}],
    },
]
tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo < 東京 >",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
out = {}


def r(name, tmpl, conv, **kw):
    try:
        out[name] = render_jinja_template([conv], chat_template=tmpl, **kw)[0][0]
    except Exception as e:
        out[name] = f"EXC {type(e).__name__}: {e}"


r("gemma3", gemma, msgs, add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>")
r("gemma3-nogen", gemma, msgs[1:3], add_generation_prompt=False, bos_token="<bos>", eos_token="<eos>")
r("gemma3-alt", gemma, [msgs[1], msgs[1]], add_generation_prompt=True, bos_token="<bos>")
r(
    "chatml",
    CHATML,
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
    ],
    add_generation_prompt=True,
)
r(
    "llama3",
    LLAMA3,
    [{"role": "system", "content": " sys "}, {"role": "user", "content": "Hi"}],
    add_generation_prompt=True,
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
)
r("llama3-nobos", LLAMA3, [{"role": "user", "content": "Hi"}], add_generation_prompt=False)
r(
    "gen",
    GEN,
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ],
    add_generation_prompt=False,
    eos_token="</s>",
)
r(
    "tojson",
    TOJSON,
    [{"role": "user", "content": "é<>&'", "thinking": "hmm"}],
    tools=tools,
    add_generation_prompt=False,
    enable_thinking=False,
)
Path(__file__).with_name("transformers-goldens.json").write_text(
    json.dumps(out, ensure_ascii=False, indent=1), encoding="utf-8"
)
for k, v in out.items():
    print(k, repr(v))
