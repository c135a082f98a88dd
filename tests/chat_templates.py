"""Chat templates for tests, as a per-model `chat_template` override would supply them.

HERMES is a tool-aware template in the Hermes / Qwen 2.5 style: tools listed in `<tools>`,
calls written as `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, results in
`<tool_response>`. The others are the marker lines of the Llama 3.1, Mistral and Qwen3-Coder
families, enough to tell the formats apart.
"""

HERMES = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}You are a helpful \
assistant.{%- endif %}
{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, \
"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) \
or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}\
{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}\
{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}\
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

LLAMA3 = """\
{{- bos_token }}{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\
Respond in the format {"name": function name, "parameters": dictionary of arguments}.\
{%- for t in tools %}{{- '\\n' }}{{- t | tojson }}{%- endfor %}{{- '<|eot_id|>' }}{%- endif %}\
{%- for message in messages %}\
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}\
{%- if message.role == 'assistant' and message.tool_calls %}\
{{- '{"name": "' + message.tool_calls[0].function.name + '", "parameters": ' }}\
{{- message.tool_calls[0].function.arguments | tojson }}{{- '}' }}\
{%- else %}{{- message.content }}{%- endif %}{{- '<|eot_id|>' }}{%- endfor %}\
{%- if tools %}<|python_tag|>{%- endif %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\
{%- endif %}"""

MISTRAL = """\
{{- bos_token }}{%- for message in messages %}\
{%- if message.role == 'user' %}{{- '[INST] ' + message.content + '[/INST]' }}\
{%- elif message.tool_calls %}{{- '[TOOL_CALLS] ' + message.tool_calls | tojson + eos_token }}\
{%- else %}{{- message.content + eos_token }}{%- endif %}{%- endfor %}"""

QWEN3_CODER = """\
{%- for message in messages %}<tool_call>\\n<function=x>\\n<parameter=y>\\n{%- endfor %}"""

# A DeepSeek-R1-style template: ChatML whose generation prompt opens a thinking block, and
# which drops an earlier reply's thinking from the history.
THINKING = """\
{%- for message in messages %}
{%- set content = message.content %}
{%- if message.role == 'assistant' and '</think>' in content %}\
{%- set content = content.split('</think>')[-1] %}{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}
"""
