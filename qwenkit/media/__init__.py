"""Media inputs for vision-language models: decoding untrusted image bytes and turning images into patches."""
