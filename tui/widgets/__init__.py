"""The chat app's widgets and screens."""
