"""Built-in chat templates that ``chat_template: NAME`` writes into the output's tokenizer.

Each is a Jinja template for transformers' ``apply_chat_template`` (``messages`` with ``role``
and ``content``, ``add_generation_prompt``, ``bos_token``/``eos_token``), written for alloykit
from the public prompt formats of each model family.
"""

from __future__ import annotations

CHAT_TEMPLATES: dict[str, str] = {
    # Alpaca: instruction / response blocks; a system message is a preamble.
    "alpaca": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}"
        "{%- elif message['role'] == 'user' -%}"
        "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
        "{%- else -%}{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
    ),
    # ChatML (Qwen, many fine-tunes): <|im_start|>role\ncontent<|im_end|>\n per turn.
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    # EXAONE: [|role|]content, turns other than the user's closed by [|endofturn|].
    "exaone": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- '[|user|]' + message['content'] + '\\n' -}}"
        "{%- else -%}"
        "{{- '[|' + message['role'] + '|]' + message['content'] + '[|endofturn|]\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
    ),
    # Llama 3: header-delimited turns closed by <|eot_id|>, after the BOS token.
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
        "{{- message['content'] | trim + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
        "{%- endif -%}"
    ),
    # Mistral: [INST] user [/INST] answer</s>; a system message opens the first instruction.
    "mistral": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{- '[INST] ' + message['content'] + '\\n\\n' -}}"
        "{%- elif message['role'] == 'user' -%}"
        "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'system' -%}"
        "{{- '[INST] ' -}}{%- endif -%}"
        "{{- message['content'] + ' [/INST]' -}}"
        "{%- else -%}{{- message['content'] + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
}
