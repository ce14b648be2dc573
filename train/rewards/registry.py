"""The scorers by name: ``build_scorers("ocr,style", ...)`` for the reward server, in-process rewards, the app and
the deployment check. Each scorer's module is imported only when it is asked for: OCR loads rapidocr, style
loads torch and transformers (seconds of start-up and gigabytes a server without those scorers never needs).
"""

from __future__ import annotations

from .base import SCORER_NAMES, Scorer


def build_scorers(names, siglip_path=None, vlm_url=None, vlm_model=None, device: str = "cpu",
                  vlm_api_key: str | None = None, vlm_timeout: float = 60.0) -> dict[str, Scorer]:
    """Instantiate the named scorers (a list or a comma-separated string)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("no scorers requested")
    unknown = [n for n in names if n not in SCORER_NAMES]
    if unknown:
        raise ValueError(f"unknown scorer(s) {', '.join(unknown)}; known: {', '.join(SCORER_NAMES)}")
    out: dict[str, Scorer] = {}
    for name in names:
        if name == "ocr":
            from .ocr import OCRScorer

            out[name] = OCRScorer()
        elif name == "style":
            if not siglip_path:
                raise ValueError("the style scorer needs a SigLIP folder (--siglip_path)")
            from .style import StyleScorer

            out[name] = StyleScorer(siglip_path, device=device)
        elif name == "background":
            from .background import BackgroundScorer

            out[name] = BackgroundScorer()
        elif name == "vlm":
            if not vlm_url or not vlm_model:
                raise ValueError("the vlm scorer needs --vlm_url and --vlm_model")
            from .vlm import VLMScorer

            out[name] = VLMScorer(vlm_url, vlm_model, api_key=vlm_api_key, timeout=vlm_timeout)
        elif name == "contrast":
            from .contrast import ContrastScorer

            out[name] = ContrastScorer()
    return out
