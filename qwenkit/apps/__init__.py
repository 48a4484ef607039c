"""The article's products, built only on qwenkit's public API: the tool-using assistant and live captions."""
