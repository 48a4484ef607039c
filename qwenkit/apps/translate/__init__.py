"""Live captions: speech in one language, captions in another, on the device (`qwenkit translate`).

    from qwenkit.apps.backend import open_chat
    from qwenkit.apps.translate import Captioner, Translator, WhisperASR, file_chunks, paced
    from qwenkit import hub

    asr = WhisperASR(hub.pull("whisper:base"), language="zh")
    captioner = Captioner(asr, Translator(open_chat("qwen2.5-coder:0.5b"), "zh", "en"))
    for caption in captioner.captions(paced(file_chunks("talk.mp3")), live=True):
        print(caption.final, caption.start, caption.end, caption.source, caption.text)
"""

from typing import TYPE_CHECKING

from qwenkit._lazy import lazy_exports

__all__ = ["Caption", "Captioner", "Translator", "WhisperASR", "file_chunks", "paced", "pcm_chunks"]

__getattr__ = lazy_exports("qwenkit.apps.translate", {
    "Caption": "qwenkit.apps.translate.captioner", "Captioner": "qwenkit.apps.translate.captioner",
    "Translator": "qwenkit.apps.translate.translator", "WhisperASR": "qwenkit.apps.translate.asr",
    "file_chunks": "qwenkit.apps.translate.audio", "paced": "qwenkit.apps.translate.audio",
    "pcm_chunks": "qwenkit.apps.translate.audio",
})

if TYPE_CHECKING:
    from qwenkit.apps.translate.asr import WhisperASR
    from qwenkit.apps.translate.audio import file_chunks, paced, pcm_chunks
    from qwenkit.apps.translate.captioner import Caption, Captioner
    from qwenkit.apps.translate.translator import Translator
