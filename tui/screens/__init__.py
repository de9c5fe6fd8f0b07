"""The chat app's full screens (the small modal ones are in `tui.widgets`)."""
