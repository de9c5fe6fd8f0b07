"""Generation on top of the model's forward: sampling and stopping, prompt caches, batches, chat sessions."""
