/// safetensors and PEFT adapter folders.
