"""Tool calling, engine-neutral: how tools reach the chat template (``render``) and how a model
family's tool-call text becomes OpenAI ``tool_calls`` (``parsers``)."""
