"""Calibrate tab: choose a model, prompt sets, K neutral inputs and the formulation parameters; fit with a progress
bar; save or load the state."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import gradio as gr

from ..core.state import STATE_JSON, STATE_TENSORS, MarsConfig
from ..data.datasets import load_prompts
from ..fit.calibrate import FitChoices, calibrate
from .common import MODEL_QUEUE, gr_progress, session_key, user_errors
from .session import Session

__all__ = ["HUB_PRESETS", "PRESETS", "build", "presets", "state_summary"]

HUB_PRESETS = ["Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct", "llava-hf/llava-1.5-7b-hf",
               "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
               "google/gemma-3-4b-it"]


def presets() -> list[str]:
    """The reading grafts built on this machine (`python -m mars_viz graft`; a lab MLLM that reads, so typography
    carries meaning), then the hub presets."""
    from ..model.reader import built_grafts

    return built_grafts() + HUB_PRESETS


PRESETS = HUB_PRESETS  # kept for importers; the dropdown uses presets()


def state_summary(session: Session) -> dict:
    bb = session.backbone
    if bb is None:  # `Session.switch_model` is loading another model
        return {"model": "loading another model…", "state": "not fitted yet"}
    out = {"model": bb.describe(), "load_options": session.options.describe()}
    s = session.state
    if s is None:
        out["state"] = "not fitted yet: press Fit (or run an input in Explore, which fits with the defaults)"
        return out
    d, g = s.diagnostics, s.gate_layer
    # the gate's own site (its position's held-out rates); states before positions have only t_post's lists
    site = d.gate_choice.get(s.gate_position, {})
    sep = site.get("separability") or [float(x) for x in d.layer_scores.separability]
    fpr = site.get("fpr_harmless") or d.gate_fpr
    fnr = [1 - x for x in site["tpr"]] if site.get("tpr") else d.gate_fnr
    out["state"] = {"source": session.state_source, "layer": s.layer, "detect_layer": g,
                    "gate_position": s.gate_position, "tau": round(s.tau, 4), "target_level": s.target_level,
                    "target_curve": {f"{k:g}": v for k, v in d.target_curve.items()},
                    "separability_at_detect_layer": round(float(sep[g]), 4),
                    "gate_fpr_heldout_harmless": round(fpr[g], 4) if fpr else None,
                    "gate_fnr_heldout_harmful": round(fnr[g], 4) if fnr else None,
                    "steerability_at_layer": round(float(d.layer_scores.steerability[s.layer]), 4),
                    "refusal_opening": s.diagnostics.refusal_opening, "behaviour_filter": s.diagnostics.behaviour,
                    "modalities": sorted(s.offsets), "config": s.config.to_dict()}
    return out


def _path(f):
    return None if f is None else (f.get("path") if isinstance(f, dict) else getattr(f, "name", f))


def _model_section(session: Session | None = None) -> tuple[gr.Dropdown, gr.Button]:
    """The model picker. Its label says what this server loads: anything (`--allow-any-model`, or no session), else
    only the presets and the models in its Hugging Face cache (offered in the list too)."""
    gr.Markdown("### Model")
    if session is None or session.allow_any_model:
        choices, label = presets(), "Preset, any hub id, or a local folder"
    else:
        from .session import cached_mllms

        choices = presets() + [r for r, _ in cached_mllms() if r not in presets()]
        label = ("Preset or a model in this server's Hugging Face cache (any other hub id or folder needs a server "
                 "started with --allow-any-model)")
    # Custom values stay allowed: a refused one then gets the handler's message, not a bare "not in the choices".
    model = gr.Dropdown(choices, value=None, allow_custom_value=True, elem_id="model_id", label=label)
    load_model = gr.Button("Load model (replaces the current one for every user)", elem_id="load_model")
    return model, load_model


def _calibration_section() -> tuple[list, gr.Button]:
    """The fit's inputs (in the order of `/fit`'s parameters) and the Fit button."""
    gr.Markdown("### Calibration")
    harmful = gr.File(label="Harmful prompts (.txt/.jsonl/.json/.csv; default: built-in set)", elem_id="harmful_file")
    harmless = gr.File(label="Harmless prompts (default: built-in set)", elem_id="harmless_file")
    with gr.Row():
        max_prompts = gr.Number(value=128, precision=0, label="Prompts per set (0 = all)")
        k_neutral = gr.Number(value=16, precision=0, label="K neutral inputs")
        neutral_prompts = gr.Number(value=32, precision=0, label="Safe prompts × neutral inputs")
    with gr.Row():
        margin = gr.Number(value=0.1, label="Gate ramp margin m")
        levels = gr.Textbox(value="1,1.5,2,3,4,6,8", label="Target-level grid")
        layer = gr.Textbox(value="", label="Force push layer (empty = auto)")
        detect_layer = gr.Textbox(value="", label="Force gate (detection) layer (empty = auto)")
    behaviour = gr.Checkbox(value=True, label="Behaviour filter (refused harmful / answered harmless only)")
    fit = gr.Button("Fit", variant="primary", elem_id="fit")
    return [harmful, harmless, max_prompts, k_neutral, neutral_prompts, margin, levels, layer, behaviour,
            detect_layer], fit


def _state_files_section() -> tuple[gr.Button, gr.File, gr.File]:
    gr.Markdown("### Save or load a state")
    save = gr.Button("Download the fitted state (zip: safetensors + JSON)", elem_id="save_state")
    saved = gr.File(label="State", elem_id="state_file")
    upload = gr.File(label="Load a state: mars_state.json + mars_state.safetensors (or the zip)",
                     file_count="multiple", elem_id="load_state_files")
    return save, saved, upload


def _check_model_allowed(session: Session, model: str) -> None:
    """Unless the server was started with --allow-any-model, only the presets, the models in the local Hugging Face
    cache (repo id or snapshot folder) and the current model may be loaded: a page must not make the server read an
    arbitrary folder or download an arbitrary repo. ValueError otherwise, naming what is allowed."""
    if session.allow_any_model:
        return
    import os

    from .session import cached_mllms

    cached = cached_mllms()
    names = list(dict.fromkeys([r for r, _ in cached] + presets()))  # what is on this machine first
    allowed = set(names) | {str(p) for _, p in cached}
    if session.loaded is not None:
        allowed |= {session.loaded.source, session.loaded.model_id}
    model = model.strip()
    if model in allowed:
        return
    try:  # the same folder written another way (a trailing slash, a relative path, a symlink)
        real = os.path.realpath(model)
        if any(os.path.realpath(a) == real for a in allowed if os.path.isabs(a)):
            return
    except (OSError, ValueError):  # e.g. an embedded NUL byte: refused below
        pass
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    current = f"; or the current model {session.loaded.model_id}" if session.loaded is not None else ""
    raise ValueError(f"loading {model!r} is refused: this server loads only the models in its Hugging Face cache "
                     f"and its presets ({shown}){current}. Start the server with --allow-any-model to load "
                     "arbitrary local folders or hub ids")


def _load_model_handler(session: Session):
    # Loads the way the app was launched (`Session.options`: --dtype, --device-map, ...), after releasing the current
    # model. A failure is an error that says what happened to the previous model (loaded again, or the demo model).
    @user_errors("load_model")
    def do_load_model(model: str, request: gr.Request = None):
        if not model or not str(model).strip():
            raise ValueError("choose a preset, type a hub id, or give a local folder")
        _check_model_allowed(session, str(model))
        with session.work(session_key(request), f"being replaced by {model}"):
            session.switch_model(str(model))
        gr.Info(f"loaded {model} ({session.options.describe()}); fit or load a MARS state for it")
        return state_summary(session)

    return do_load_model


def _fit_handler(session: Session):
    @user_errors("fit")
    def do_fit(harmful=None, harmless=None, max_prompts: int = 128, k_neutral: int = 16, neutral_prompts: int = 32,
               margin: float = 0.1, levels: str = "1,1.5,2,3,4,6,8", layer: str = "", behaviour_filter: bool = True,
               detect_layer: str = "", request: gr.Request = None, progress=gr.Progress()):
        cfg = MarsConfig(max_prompts=None if int(max_prompts or 0) == 0 else int(max_prompts),
                         k_neutral=int(k_neutral), neutral_prompts=int(neutral_prompts), margin=float(margin),
                         levels=tuple(float(x) for x in str(levels).split(",") if x.strip()),
                         behaviour_filter=bool(behaviour_filter))
        choices = FitChoices(layer=int(layer) if str(layer).strip() else None,
                             detect_layer=int(detect_layer) if str(detect_layer).strip() else None)
        hp = load_prompts(_path(harmful)) if harmful else None
        sp = load_prompts(_path(harmless)) if harmless else None
        with session.work(session_key(request), "being calibrated in the Calibrate tab"):
            state = calibrate(session.backbone, cfg, hp, sp, choices=choices,
                              progress=gr_progress(progress, session, "being calibrated in the Calibrate tab"))
            session.config = cfg
            session.set_state(state, "fitted in the Calibrate tab")
        for note in state.diagnostics.behaviour.get("notes", []):
            gr.Warning(note)
        return state_summary(session)

    return do_fit


def _save_handler(session: Session):
    @user_errors("save_state")
    def do_save(request: gr.Request = None):
        if session.state is None:
            raise ValueError("no state to save yet: fit one first")
        tmp = session.files.folder(session_key(request))
        session.state.save(tmp / "state")
        zpath = tmp / "mars_state.zip"
        with zipfile.ZipFile(zpath, "w") as z:
            for name in (STATE_JSON, STATE_TENSORS):
                z.write(tmp / "state" / name, name)
        return str(zpath)

    return do_save


def _gather_state_files(paths: list[Path], into: Path) -> None:
    """Copy an uploaded state (the zip, or mars_state.json + mars_state.safetensors) into the folder `into`."""
    for p in paths:
        if p.suffix == ".zip":
            with zipfile.ZipFile(p) as z:
                for name in (STATE_JSON, STATE_TENSORS):
                    if name in z.namelist():
                        (into / name).write_bytes(z.read(name))
        elif p.suffix == ".json":
            shutil.copy(p, into / STATE_JSON)
        elif p.suffix == ".safetensors":
            shutil.copy(p, into / STATE_TENSORS)


def _upload_handler(session: Session):
    @user_errors("load_state")
    def do_upload(files: list, request: gr.Request = None):
        paths = [Path(_path(f)) for f in (files or [])]
        if not paths:
            raise ValueError("upload mars_state.json and mars_state.safetensors, or the zip from 'Download'")
        key = session_key(request)
        tmp = session.files.folder(key)  # the files go in under the state's own names, never the client's
        try:
            _gather_state_files(paths, tmp)
            with session.work(key, "loading a MARS state"):
                session.load_state(tmp)
        except zipfile.BadZipFile as e:  # a broken JSON is a ValueError (JSONDecodeError) already
            raise ValueError(f"{e}: upload the zip from 'Download', or mars_state.json + mars_state.safetensors") \
                from None
        gr.Info("state loaded")
        return state_summary(session)

    return do_upload


def build(session: Session) -> None:
    with gr.Row():
        with gr.Column():
            model, load_model = _model_section(session)
            fit_inputs, fit = _calibration_section()
            save, saved, upload = _state_files_section()
        with gr.Column():
            summary = gr.JSON(value=lambda: state_summary(session), label="Model and state", elem_id="state_summary")
    load_model.click(_load_model_handler(session), model, summary, api_name="load_model", **MODEL_QUEUE)
    fit.click(_fit_handler(session), fit_inputs, summary, api_name="fit", **MODEL_QUEUE)
    save.click(_save_handler(session), None, saved, api_name="save_state")
    upload.upload(_upload_handler(session), upload, summary, api_name="load_state", **MODEL_QUEUE)
