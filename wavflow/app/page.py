"""The Gradio page: widgets, the two actions (generate; compare modes) and how their inputs
and errors pass to `generation.Studio`. Nothing here samples or writes audio itself."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gradio as gr

from wavflow.app.generation import MODES, Result, Studio, parse_request, request_folder
from wavflow.errors import WavFlowError
from wavflow.long_form.plan import check_long_form_mode, LONG_FORM_MODES
from wavflow.model.flow import SAMPLING_METHODS

log = logging.getLogger("wavflow.app")

INTRO = """# WavFlow
Sound for a video, a caption, or both, from the checkpoint `{ckpt}` ({preset}, {sr} Hz, trained on
{trained:g} s clips; up to {dur:g} s in overlapping windows). Give a video (V2A), a caption (T2A) or both (VT2A); **Compare modes** makes all three from
one video and caption with the same seed. Every result lists its settings and the `predict.sh`
command that makes the same clip."""


def _model_calls(method: str, steps: int) -> int:
    """Network calls the sampler makes (the progress bar's length); 0 when not known ahead."""
    return {"euler": steps, "heun": 2 * steps - 1}.get(method, 0)


@contextlib.contextmanager
def _uploaded(studio: Studio, video: Optional[str]) -> Iterator[Optional[str]]:
    """The upload copied into a folder of this request's own, removed when the request ends.
    Gradio's own copy stays in its cache (the page sends it again on the next click), which
    lives under output.output_dir and is swept by the Blocks' delete_cache."""
    if not video:
        yield None
        return
    folder = request_folder(studio.out_root / ".uploads")
    try:
        local = folder / Path(video).name
        shutil.copyfile(video, local)
        yield str(local)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _shown(exc: BaseException) -> gr.Error:
    """An error as the page shows it: our message, never a traceback."""
    if isinstance(exc, WavFlowError):
        return gr.Error(str(exc).strip().splitlines()[0])
    log.exception("request failed")
    return gr.Error(f"Generation failed ({type(exc).__name__}: {exc}); the server log has the details.")


def _run(studio: Studio, fields: dict[str, Any], modes: tuple[str, ...], progress: Any) -> list[Result]:
    with _uploaded(studio, fields.pop("video")) as video:
        request = parse_request(video=video, limits=studio.limits, **fields)
        wanted = [request.without(m) for m in modes] if modes else [request]
        total = _model_calls(request.method, request.steps) * len(wanted)
        results: list[Result] = []
        for k, item in enumerate(wanted):
            def on_step(done: int, k: int = k, mode: str = item.mode) -> None:
                if total:
                    progress((k * total // len(wanted) + done) / total, desc=f"{mode}: sampling step {done}")
            results.append(studio.run(item, on_step=on_step))
        return results


def _handler(studio: Studio, modes: tuple[str, ...]) -> Callable[..., Any]:
    def handle(video, caption, steps, cfg, cfg_interval, method, seed, duration, use_ema, long_form="auto",
               window_overlap_sec=None, progress=gr.Progress()):  # noqa: B008 - Gradio's way to ask for a progress bar
        fields = dict(video=video, caption=caption, steps=steps, cfg=cfg, cfg_interval=cfg_interval, method=method,
                      seed=seed, duration=duration, use_ema=use_ema, long_form=long_form,
                      window_overlap_sec=window_overlap_sec)
        if modes and not (video and (caption or "").strip()):
            raise gr.Error("Compare modes needs both a video and a caption.")
        try:
            results = _run(studio, fields, modes, progress)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a message in the page
            raise _shown(exc) from None
        if not modes:
            r = results[0]
            return (str(r.wav), str(r.mp4) if r.mp4 else None, str(r.spectrogram),
                    json.dumps(r.settings, indent=1))
        return tuple(v for r in results for v in (str(r.wav), str(r.spectrogram)))
    return handle


def build_page(studio: Studio) -> gr.Blocks:
    cfg, limits = studio.cfg, studio.limits
    gen = studio.generator(bool(cfg.model.use_ema))
    # Gradio's cached uploads and outputs older than a day are removed hourly
    with gr.Blocks(title="WavFlow", analytics_enabled=False, delete_cache=(3600, 86400)) as page:
        gr.Markdown(INTRO.format(ckpt=cfg.model.ckpt_path, preset=gen.cfg.model.name, sr=gen.sample_rate,
                                 trained=limits.trained_duration, dur=limits.max_duration))
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Video (optional)", sources=["upload"], elem_id="video_in")
                caption = gr.Textbox(label="Caption (optional)", placeholder="e.g. two sharp clicks", elem_id="caption")
                with gr.Accordion("Sampling", open=True):
                    steps = gr.Slider(1, 200, value=int(cfg.sampling.num_steps), step=1, label="Steps", elem_id="steps")
                    cfg_scale = gr.Slider(0.0, 10.0, value=float(cfg.inference.cfg), step=0.1,
                                          label="CFG scale (<= 1: no guidance)", elem_id="cfg")
                    interval = cfg.inference.cfg_interval
                    cfg_interval = gr.Textbox(value=", ".join(str(v) for v in interval) if interval else "",
                                              label="CFG interval 'lo, hi' (flow time; empty: every step)")
                    method = gr.Dropdown(list(SAMPLING_METHODS), value=str(cfg.sampling.method), label="Sampler")
                    seed = gr.Number(value=int(cfg.inference.seed), precision=0, label="Seed", elem_id="seed")
                    duration = gr.Number(value=0, minimum=0, maximum=limits.max_duration, elem_id="duration",
                                         label=f"Duration (s, up to {limits.max_duration:g}; 0: the whole video, "
                                               f"or {limits.trained_duration:g} s for a caption alone; past "
                                               f"{limits.trained_duration:g} s in windows)")
                    long_form = gr.Dropdown(list(LONG_FORM_MODES), value=check_long_form_mode(cfg.inference.long_form),
                                            label="Long form (windows past the trained duration)", elem_id="long_form")
                    overlap = cfg.inference.window_overlap_sec
                    window_overlap = gr.Textbox(value="" if overlap is None else f"{overlap:g}", elem_id="window_overlap",
                                                label="Window overlap (s; empty: half the window)")
                    use_ema = gr.Checkbox(value=bool(cfg.model.use_ema), interactive=studio.has_both_weights,
                                          label="EMA weights" + ("" if studio.has_both_weights else " (only one set in this file)"))
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    compare = gr.Button("Compare modes", elem_id="compare")
            with gr.Column():
                audio = gr.Audio(type="filepath", label="Generated audio (wav)", elem_id="audio_out", buttons=["download"])
                muxed = gr.Video(label="Video with the generated audio (mp4)", elem_id="video_out")
                picture = gr.Image(type="filepath", label="Log-mel spectrogram", elem_id="spectrogram")
                settings = gr.Code(language="json", label="Settings, CSV row and predict.sh command", elem_id="settings")
        gr.Markdown("### Compare modes (same seed)")
        with gr.Row():
            compared = []
            for mode in MODES:
                with gr.Column():
                    compared += [gr.Audio(type="filepath", label=mode, elem_id=f"audio_{mode}"),
                                 gr.Image(type="filepath", label=f"{mode} log-mel", elem_id=f"spectrogram_{mode}")]
        inputs = [video, caption, steps, cfg_scale, cfg_interval, method, seed, duration, use_ema, long_form,
                  window_overlap]
        go.click(_handler(studio, ()), inputs, [audio, muxed, picture, settings], api_name="generate")
        compare.click(_handler(studio, MODES), inputs, compared, api_name="compare_modes")
    return page
