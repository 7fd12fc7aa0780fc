"""The model floor: the Llama architecture, the model-dir format, the chat format and tokenizer loading."""
