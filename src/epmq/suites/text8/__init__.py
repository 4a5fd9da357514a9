"""The built-in text8 suite: MiniLM experts on eight real text-classification tasks."""
