"""`omni`: the platform's command line.

    omni demo [overrides]                         demo data -> whole DAG locally -> serve -> ask
    omni data make-demo --out DIR [overrides]     generate the omni-tiny demo set
    omni data prep INPUT... --out DIR [overrides] validate/normalise/dedup/split/shard records (+ quarantine);
                                                  INPUT and DIR may be s3://bucket/prefix
    omni pipeline compile [--out FILE]            the YAML to upload in the Kubeflow UI / kfp run submit
    omni pipeline run --data DIR [overrides]      the whole DAG on this machine (kfp.local)
    omni serve --model-dir DIR | --model-version champion
    omni realtime FILE [--url URL --token T --pace 1 --commit]
                                                  stream a WAV (or a video's sound) to /v1/realtime, print the answer
    omni model plan [--gpus 8 --gpu-gib 80]       parameter counts + per-GPU memory for ZeRO-2/3
    omni train STAGE --data D --init C --out O    one training stage outside the DAG (torchrun for N GPUs)
    omni eval run --benchmark NAME --data PATH --model-dir DIR   a registry benchmark on a checkpoint
    omni eval score FILE --metric NAME [--lang en|zh] [--details OUT]   score predictions made by anything
    omni model compose --llm URI --vision URI --audio URI --out DIR
                                                  an omni checkpoint from Hugging Face parts (folders or s3://)
    omni model export-hf --model-dir DIR --out DIR
                                                  the trained LLM as a Hugging Face Qwen2ForCausalLM folder
    omni config [overrides]                       print the resolved, validated config
    omni cluster render --out DIR [--values FILE] every manifest for a cluster (chart, ISVC, TrainJob, node pools)
    omni cluster node-pools                       regenerate infra/ node pools from conf/cluster
    omni rollback [--out DIR]                     champion back to previous-champion, re-apply the ISVC

Overrides are Hydra's: `model=tiny stages.sft.steps=100 tracking.uri=http://mlflow:5000`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_COMPILED = Path(__file__).resolve().parent / "compiled" / "omni_pipeline.yaml"
REPO = Path(__file__).resolve().parents[1]


def fail(message: str) -> int:
    """A problem the user can fix (missing input, unreachable store, bad values): one line, exit 2."""
    print(f"omni: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------ handlers
# Each takes the validated config and the parsed arguments and returns the exit code.


def _config(cfg, args) -> int:
    import yaml

    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return 0


def _demo(cfg, args) -> int:
    from pipelines.demo import run_demo

    run_demo(cfg, keep_serving=args.keep_serving)
    return 0


def _make_demo(cfg, args) -> int:
    from model.data.demo import make_demo

    print(make_demo(args.out, cfg.data))
    return 0


def _prep(cfg, args) -> int:
    from model.data.prep import prepare
    from model.storage import StorageError

    try:
        result = prepare(args.inputs, args.out, cfg.data, cfg.model)
    except (FileNotFoundError, StorageError) as err:  # a missing input or unreachable store: no traceback
        return fail(str(err))
    m = result.manifest
    print(f"{m['records_in']} in, {m['records_out']} out, {m['records_quarantined']} quarantined "
          f"(see {args.out.rstrip('/')}/quarantine.jsonl)")
    return 0


def _compile(cfg, args) -> int:
    from pipelines.compile import compile_pipeline

    print(compile_pipeline(cfg, args.out))
    return 0


def _run(cfg, args) -> int:
    import json

    from pipelines.local import run_local

    result = run_local(cfg, args.data, cache=not args.no_cache)
    print(json.dumps({"version": result["version"], "verdict": result["verdict"],
                      "overall": result["evaluation"]["overall"]}))
    return 0


def _train(cfg, args) -> int:
    import json

    from components.config import parse_task_config
    from components.slices import task_slice
    from components.steps.training import train
    from model import runtime
    from model.nn.checkpoint import weights_sha256
    from model.training.distributed import leave_group_at_exit

    if args.stage not in cfg.stages:
        return fail(f"unknown stage {args.stage!r}; the config has {', '.join(cfg.stages)}")
    if not (args.init / "omni_config.json").is_file():
        return fail(f"--init {args.init}: not an omni checkpoint (no omni_config.json); make one with "
                    "`omni model compose` or take a stage's output")
    primary = runtime.ranks().primary
    stage_cfg = parse_task_config(task_slice(cfg, "stage", args.stage))  # what the DAG's stage task gets
    result = train(stage_cfg, args.stage, args.data, args.init, args.out, progress=primary)
    leave_group_at_exit()
    if primary:  # only rank 0 saves the checkpoint (and speaks for the run)
        print(json.dumps({"steps": result["steps"], "final_loss": result.get("final_loss"),
                          "weights_sha256": weights_sha256(args.out)}))
    return 0


def _plan(cfg, args) -> int:
    from model.nn.plan import format_plan

    checkpointing = {"stage": None, "on": True, "off": False}[args.checkpointing]
    print(format_plan(cfg.model, cfg.ordered_stages(), args.gpus, args.gpu_gib, args.micro_batch,
                      checkpointing=checkpointing))
    return 0


def _compose(cfg, args) -> int:
    import json

    from model.nn.compose import compose
    from model.storage import StorageError

    try:
        report = compose(cfg.model, args.out, seed=cfg.data.seed, log=print)
    except (FileNotFoundError, StorageError, ValueError) as err:  # a bad source or a config that contradicts it
        return fail(str(err))
    for part in ("llm", "vision", "audio"):
        r = report[part]
        where = f"from {r['source']}" if r["source"] else "fresh (no source given)"
        print(f"{part:<7}{where}: {r['tensors_loaded']} tensors / {r['parameters_loaded']:,} parameters loaded, "
              f"{r['tensors_dropped']} dropped, {r['new_parameters']:,} new parameters ({r['new_rows']} new rows)")
    print(f"projectors: {report['projectors']['new_parameters']:,} new parameters; checkpoint written to {args.out}")
    print(json.dumps(report))
    return 0


def _export_hf(cfg, args) -> int:
    import json

    from model.export.hf import export_llm

    try:
        report = export_llm(args.model_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        return fail(str(err))
    print(f"wrote {report['architecture']} ({report['parameters']:,} parameters, {report['dtype']}) and its "
          f"tokenizer ({report['added_tokens']} added tokens) to {args.out}")
    print(json.dumps(report))
    return 0


def _serve(cfg, args) -> int:
    from serving.server import serve

    model_dir = args.model_dir or _download(cfg, args.model_version)
    serving_cfg = cfg.serving.model_copy(update={"http_port": args.http_port} if args.http_port else {})
    serve(model_dir, serving_cfg)
    return 0


def _realtime(cfg, args) -> int:
    import os

    from serving.auth import TOKEN_ENV
    from serving.protocol.realtime import client

    url = args.url or f"ws://127.0.0.1:{cfg.serving.http_port}{client.ROUTE}"
    try:
        _, code = client.run(url, args.file, token=args.token or os.environ.get(TOKEN_ENV) or None, pace=args.pace,
                             commit=args.commit, rate=args.rate, timeout_s=args.timeout)
    except client.ClientError as err:
        return fail(str(err))
    return code


def _render(cfg, args) -> int:
    from components.cluster import render
    from components.cluster.capacity import endpoint_fit

    try:
        written = render.render_all(cfg, args.out, args.values)
    except (render.ValuesConflict, ValueError) as err:
        return fail(str(err))
    for warning in endpoint_fit(cfg):  # rendered anyway: the settings may be meant for another model
        print(f"omni: warning: {warning}", file=sys.stderr)
    print("\n".join(map(str, written)))
    return 0


def _node_pools(cfg, args) -> int:
    from components.cluster import render

    print("\n".join(map(str, render.write_node_pools(cfg, args.out))))
    return 0


def _rollback(cfg, args) -> int:
    from components.steps.lifecycle import rollback

    version, _ = rollback(cfg, args.out)
    where = "applied to the cluster" if cfg.cluster.target == "kubernetes" else "written"
    print(f"champion is version {version} again; InferenceService {where} ({args.out / 'inferenceservice.yaml'})")
    return 0


def _eval_run(cfg, args) -> int:
    import json

    from components.config import parse_task_config
    from components.reports.html import evaluation_report, text_table, write_report
    from components.slices import task_slice
    from components.steps.evaluation import evaluate_checkpoint

    if args.data is not None:
        if len(args.benchmark) != 1:
            return fail("--data names one benchmark's data: give one --benchmark with it")
        name = args.benchmark[0]
        cfg.benchmark[name] = cfg.benchmark[name].model_copy(update={"data": str(Path(args.data).resolve())})
    model_dir = args.model_dir or _download(cfg, args.model_version)
    try:
        eval_cfg = parse_task_config(task_slice(cfg, "evaluate"))  # what the DAG's evaluate task gets
        summary = evaluate_checkpoint(eval_cfg, model_dir, args.out, names=args.benchmark)
    except (FileNotFoundError, KeyError) as err:
        return fail(str(err).strip('"'))
    if summary is None:  # not the primary rank of a sharded run
        return 0
    write_report(args.out / "report.html", evaluation_report(f"Evaluation — {model_dir}", summary))
    print(text_table(summary))
    print(f"results: {args.out / 'metrics.json'}, {args.out / 'predictions.jsonl'}, {args.out / 'report.html'}")
    keys = ("metric", "value", "stderr", "n", "items", "failed", "read_failures", "answered", "cached", "data_sha256")
    print(json.dumps({n: {k: r[k] for k in keys} for n, r in summary["benchmarks"].items()}))
    return 0


def _download(cfg, version: str) -> Path:
    from components.registry import tracking
    from components.steps.lifecycle import mlflow_uri

    dst = cfg.workdir() / "serving" / str(version)
    return tracking.download_version(mlflow_uri(cfg), cfg.tracking.registered_model, version, dst)


def _eval_score(cfg, args) -> int:
    import json

    from pydantic import ValidationError

    from model.eval.items import ScoreRow
    from model.eval.metrics import score_rows

    rows = []
    try:
        lines = Path(args.file).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        return fail(f"cannot read {args.file}: {err.strerror}")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(ScoreRow.model_validate_json(line))
        except ValidationError as err:
            where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in err.errors())
            return fail(f"{args.file} line {n}: {where} (expected {{\"id\", \"prediction\", \"answers\": [...], "
                        f"\"choices\" (MCQ), \"lang\"}})")
    if not rows:
        return fail(f"{args.file} has no predictions")
    score = score_rows(args.metric, rows, args.lang)
    if args.details:
        mcq = args.metric == "mcq_accuracy"
        Path(args.details).write_text("".join(json.dumps(i.to_json(mcq), ensure_ascii=False) + "\n"
                                              for i in score.items))
    print(f"{args.metric} over {score.n} {'groups' if score.n != len(rows) else 'items'}: {score.value:.6g}"
          + (f" ± {score.stderr:.3g}" if score.stderr is not None else ""))
    print(json.dumps(score.summary(), ensure_ascii=False))
    return 0


# ------------------------------------------------------------------------------------- parser


def _command(parent, name: str, help_: str, handler, overrides: bool = True) -> argparse.ArgumentParser:
    cmd = parent.add_parser(name, help=help_.split(". ")[0], description=help_)
    if overrides:
        cmd.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. stages.sft.steps=100")
    cmd.set_defaults(handler=handler)
    return cmd


def _group(sub, name: str, help_: str):
    return sub.add_parser(name, help=help_).add_subparsers(dest=f"{name}_command", required=True)


def _add_data(sub) -> None:
    data = _group(sub, "data", "demo data and data prep")
    make = _command(data, "make-demo", "Generate the omni-tiny demo set (images, mp4 videos, espeak-ng speech, text).",
                    _make_demo)
    make.add_argument("--out", type=Path, required=True, help="output folder (train.jsonl, val.jsonl, media/)")
    prep = data.add_parser(
        "prep", help="validate, normalise, deduplicate, split and shard records",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate, normalise (RGB PNG, 16 kHz mono WAV), deduplicate, split and tokenise JSONL\n"
        "records into tar shards + content-addressed media + manifest.json (docs/data-format.md).\n"
        "Every rejected record goes to quarantine.jsonl with its file, line, id and the reason;\n"
        "records_in = records_out + records_quarantined.\n\n"
        "  omni data prep raw/ --out prepared/\n"
        "  omni data prep s3://raw/corpus/ extra.jsonl --out s3://omni-data/prepared model.max_seq_len=512\n\n"
        "s3:// needs S3_ENDPOINT_URL (http(s)://host:port), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")
    prep.add_argument("overrides", nargs="+", metavar="INPUT|key=value",
                      help="JSONL files or folders/prefixes of them (local or s3://; media paths resolve against "
                      "each file's folder), then any Hydra overrides (arguments with '=')")
    prep.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    prep.set_defaults(handler=_prep)


def _add_pipeline(sub) -> None:
    pipe = _group(sub, "pipeline", "compile or run the DAG")
    comp = _command(pipe, "compile", "Compile the DAG to KFP YAML (upload it in the UI or `kfp run submit -f`).",
                    _compile)
    comp.add_argument("--out", type=Path, default=DEFAULT_COMPILED,
                      help=f"default: {DEFAULT_COMPILED.name} in pipelines/compiled")
    run = _command(pipe, "run", "Run the DAG on this machine with kfp.local (embedded MLflow, local artifacts).", _run)
    run.add_argument("--data", required=True, help="folder (or comma-separated JSONL files) of records")
    run.add_argument("--no-cache", action="store_true",
                     help="run every task again (default: kfp.local's cache reuses a task whose inputs are unchanged)")


def _model_source(cmd: argparse.ArgumentParser) -> None:
    """--model-dir DIR or --model-version V (a registered version or alias, downloaded from MLflow)."""
    src = cmd.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", type=Path,
                     help="a checkpoint folder (omni_config.json, model.safetensors, tokenizer/)")
    src.add_argument("--model-version", help="a registered version number or alias (e.g. champion) from MLflow")


def _add_serve(sub) -> None:
    serve = _command(sub, "serve", "Start the KServe predictor (OpenAI-style chat + v2 inference) on a checkpoint.",
                     _serve)
    _model_source(serve)
    serve.add_argument("--http-port", type=int, default=None, help="default: serving.http_port")


def _add_realtime(sub) -> None:
    rt = sub.add_parser(
        "realtime", help="stream a WAV file (or a video's sound) to /v1/realtime and print the answer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stream a sound file to the predictor's realtime endpoint (OpenAI's Realtime API over a\n"
        "WebSocket) in 100 ms input_audio_buffer.append chunks at real-time pace, let the server's voice\n"
        "activity detection end the turn (or --commit the buffer at the end), and print the answer's text\n"
        "deltas as they arrive (stdout; speech and response events go to stderr). Any WAV (rate, channels,\n"
        "sample format) or a video's sound track is converted to mono PCM16 at --rate.\n\n"
        "  omni realtime question.wav                          # a local `omni serve`\n"
        "  omni realtime clip.mp4 --url wss://omni-predictor.NS.DOMAIN/v1/realtime --pace 0\n\n"
        "The last line printed is a JSON object, the summary:\n"
        '  {"outcome": "ok" | "no_speech" | "timeout" | "errors" | "closed", "file", "audio_s",\n'
        '   "audio_sent_s" (how long sending it took), "turn_detection": "server_vad" | "commit",\n'
        '   "responses", "status" (the last response.done\'s), "deltas", "text_chars",\n'
        '   "speech_stopped_ms", "first_delta_ms", "done_ms", "errors"}\n'
        "The *_ms timings count from the end of the audio (the file's last chunk sent) to speech_stopped\n"
        "(server VAD only), to the last answer's first delta and to its response.done; null when not seen.\n"
        "Exit status: 0 when the outcome is ok; 1 otherwise (the summary says which); 2 when the endpoint\n"
        "cannot be reached, refuses the token (401) or the file has no sound (a one-line message, no summary).")
    rt.add_argument("file", type=Path, help="a WAV file, or a video (mp4, ...) whose sound track is streamed")
    rt.add_argument("--url", help="ws(s)://HOST:PORT/v1/realtime; http(s):// and a bare HOST:PORT are taken too "
                    "(default: ws://127.0.0.1:<serving.http_port>/v1/realtime)")
    rt.add_argument("--token", help="the server's API token (default: the OMNI_API_TOKEN environment variable)")
    rt.add_argument("--pace", type=float, default=1.0,
                    help="1.0 streams at real time (default), 2.0 twice as fast, 0 as fast as possible "
                         "(1 s chunks, 50 a second: under the server's default event rate limit)")
    rt.add_argument("--commit", action="store_true",
                    help="turn the server's voice activity detection off and commit the whole file as one turn "
                         "at its end (input_audio_buffer.commit + response.create)")
    rt.add_argument("--rate", type=int, default=24000, help="PCM16 rate sent to the server, 8000-48000 (default 24000)")
    rt.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the answers after the audio ends (default 120)")
    rt.set_defaults(handler=_realtime)


def _add_model(sub) -> None:
    model = _group(sub, "model", "model facts")
    plan = _command(model, "plan", "Parameter counts per module and a per-GPU memory plan per stage for ZeRO-2 and "
                    "ZeRO-3 (meta device: nothing is allocated). Example: omni model plan model=omni-7b recipe=paper",
                    _plan)
    plan.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (default 8)")
    plan.add_argument("--gpu-gib", type=float, default=80, help="memory per GPU in GiB (default 80)")
    plan.add_argument("--micro-batch", type=int, default=None,
                      help="sequences per GPU per step (default: each stage's micro_batch_size)")
    plan.add_argument("--checkpointing", choices=("stage", "on", "off"), default="stage",
                      help="activation checkpointing: as each stage's config says (default), or on/off for all")
    comp = _command(model, "compose", "Write an omni checkpoint from pretrained Hugging Face parts: a Qwen2-class "
                    "causal LM, SigLIP (two-tower SiglipModel or vision-only) and Whisper (WhisperForConditional"
                    "Generation or WhisperModel), each a folder or s3:// URI (s3 needs S3_ENDPOINT_URL, "
                    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). The architecture comes from each part's config.json "
                    "(a conf/model value that disagrees fails before any weight is read); a part not given is "
                    "freshly initialised, as are the projectors and the embedding rows of added tokens. The last "
                    "line is a JSON object with the per-part counts. Example: omni model compose --llm "
                    "s3://models/Qwen2.5-7B-Instruct --vision s3://models/siglip-so400m-patch14-384 --audio "
                    "s3://models/whisper-large-v3 --out ckpt/omni-7b model=hf", _compose)
    for part, what in (("llm", "Qwen2-class LLM"), ("vision", "SigLIP"), ("audio", "Whisper")):
        comp.add_argument(f"--{part}", metavar="URI", help=f"{what} folder or s3:// URI (default: model.init.{part})")
    comp.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    exp = _command(model, "export-hf", "Write a checkpoint's LLM (with the tokens we added) as a Hugging Face "
                   "Qwen2ForCausalLM folder that AutoModelForCausalLM.from_pretrained loads.", _export_hf)
    exp.add_argument("--model-dir", type=Path, required=True, help="an omni checkpoint folder")
    exp.add_argument("--out", type=Path, required=True, help="output folder")


def _add_train(sub) -> None:
    train = _command(sub, "train", "Run one training stage outside the DAG: what the DAG's stage task and every "
                     "TrainJob pod run. Under torchrun it trains data-parallel (`torchrun --nproc_per_node 2 -m "
                     "pipelines.cli train sft ...`); rank 0 saves the checkpoint and prints the last line, a JSON "
                     "object with steps, final_loss and weights_sha256. Example: omni train sft --data prepared/ "
                     "--init ckpt/ --out sft/ stages.sft.steps=100", _train, overrides=False)
    train.add_argument("stage", metavar="STAGE", help="a stage of the config, e.g. sft (conf/stage/)")
    train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. stages.sft.steps=100")
    train.add_argument("--data", required=True, help="data prep's output: a folder or s3://bucket/prefix")
    train.add_argument("--init", type=Path, required=True, help="the omni checkpoint the stage starts from")
    train.add_argument("--out", type=Path, required=True, help="folder for the trained checkpoint")


def _add_eval(sub) -> None:
    from model.config import BENCHMARK_METRICS

    ev = _group(sub, "eval", "run benchmarks and score predictions")
    run = _command(ev, "run", "Run registry benchmarks (conf/benchmark/<name>.yaml) on a checkpoint: read the set "
                   "as it is (no dedup or split), answer every item (cached: a rerun resumes; RANK/WORLD_SIZE "
                   "shard it), score it as lmms-eval/VLMEvalKit do. Writes metrics.json, predictions.jsonl, "
                   "report.html. Example: omni eval run --benchmark mmbench_en --data MMBench_DEV_EN.tsv "
                   "--model-dir ckpt/", _eval_run)
    run.add_argument("--benchmark", action="append", required=True, help="a name in conf/benchmark (repeatable)")
    run.add_argument("--data", help="the benchmark's file or folder (overrides benchmark.NAME.data)")
    _model_source(run)
    run.add_argument("--out", type=Path, default=Path("eval-results"), help="output folder (default eval-results)")
    score = _command(ev, "score", "Score predictions made by anything with the code the pipeline uses. FILE: one "
                     'JSON object a line, {"id": ..., "prediction": "...", "answers": ["..."], "choices": {"A": '
                     '"..."} (MCQ only), "lang": "en"}; optional "category": {field: value} for breakdowns and '
                     '"group" for CircularEval. The last line printed is a JSON object whose "value" is the metric.',
                     _eval_score, overrides=False)
    score.add_argument("file", type=Path, help="predictions, JSON lines")
    score.add_argument("--metric", required=True, choices=BENCHMARK_METRICS)
    score.add_argument("--lang", metavar="en|zh",
                       help="text normalisation for rows without a lang (default: zh for text with CJK characters, "
                            "else en)")
    score.add_argument("--details", type=Path, help="write one line per item: id, score (and letter for MCQ)")


def _add_cluster(sub) -> None:
    cluster = _group(sub, "cluster", "render the Kubernetes manifests and node pools")
    render = _command(cluster, "render", "Write every manifest the platform applies to a cluster into --out: the "
                      "namespace, charts/omni-platform rendered offline (no cluster, no helm binary needed), the "
                      "champion InferenceService that promote applies, an example 2-node TrainJob, GKE node pools and "
                      "a kind config. Images, pool labels/taints and the endpoint come from conf/cluster (change them "
                      "there or with overrides such as cluster.images.tag=0.2.0); custom resources are validated "
                      "against serving/crds. Apply with: kubectl apply -f OUT/00-namespace.yaml -f OUT/10-chart.yaml "
                      "(see docs/deploy.md).", _render)
    render.add_argument("--out", type=Path, required=True, help="output folder (created; files are overwritten)")
    render.add_argument("--values", type=Path, help="a chart values file, e.g. charts/omni-platform/ci/"
                        "production-values.yaml; keys conf/cluster owns may only repeat its values")
    pools = _command(cluster, "node-pools", "Regenerate infra/gke/node-pools.sh and infra/kind/kind-config.yaml from "
                     "conf/cluster (a test fails when the checked-in files are stale).", _node_pools)
    pools.add_argument("--out", type=Path, default=REPO / "infra", help="default: infra/ in the repository")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    demo = _command(sub, "demo", "Generate demo data, run the whole DAG locally, serve the champion and query it.",
                    _demo)
    demo.add_argument("--keep-serving", action="store_true", help="leave the predictor running at the end")
    for add in (_add_data, _add_pipeline, _add_serve, _add_realtime, _add_model, _add_train, _add_eval, _add_cluster):
        add(sub)
    _command(sub, "config", "Print the resolved and validated configuration as YAML.", _config)
    _command(sub, "rollback", "Move the MLflow alias `champion` back to `previous-champion` and serve that version "
             "again: with cluster.target=kubernetes the InferenceService is re-applied at full traffic through the "
             "Kubernetes API (in-cluster service account or your kubeconfig); otherwise its manifest is only "
             "written. Needs tracking.uri (the MLflow server) and, for the cluster, RBAC to patch InferenceServices. "
             "Example: omni rollback cluster.target=kubernetes tracking.uri=http://localhost:5000",
             _rollback).add_argument("--out", type=Path, default=Path("."),
                                     help="folder for inferenceservice.yaml (default: current folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow an option (`--out D key=value`): argparse leaves those in `extra`.
    if unknown := [a for a in extra if "=" not in a or a.startswith("-")]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    if args.handler is _prep:
        # Inputs and overrides share the positional slots: overrides are the ones with '='.
        args.inputs = [a for a in args.overrides if "=" not in a]
        args.overrides = [a for a in args.overrides if "=" in a]
        if not args.inputs:
            parser.error("data prep needs at least one INPUT (a JSONL file or a folder of them)")
    if args.handler is _eval_run:  # compose only the benchmarks asked for
        args.overrides = [f"benchmark=[{','.join(args.benchmark)}]", *args.overrides]
    if args.handler is _compose:  # the flags are config values: overrides, so the config validates with them
        quoted = {p: getattr(args, p).replace("'", "\\'") for p in ("llm", "vision", "audio") if getattr(args, p)}
        args.overrides += [f"model.init.{p}='{uri}'" for p, uri in quoted.items()]
    from components.config import ConfigError, load_config

    try:
        cfg = load_config(args.overrides)
    except ConfigError as err:
        return fail(str(err))
    return args.handler(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
