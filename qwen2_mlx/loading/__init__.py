"""Reading model folders and checkpoints (`load`), the tokenizer, where our files live, sharded loading."""
