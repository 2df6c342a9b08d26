"""The `detector` command: demo, train, evaluate, run, control, check-config and simulate."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from detector import __version__
from detector.errors import ConfigError, DataError, DetectorError

__all__ = ["main"]

log = logging.getLogger("detector")


def _demo(args: argparse.Namespace) -> int:
    from detector.demo import run_demo
    from detector.train import TrainParams

    res = run_demo(streams=args.streams, features=args.features, readings=args.readings, normal=args.normal,
                   seed=args.seed, out_dir=args.out, progress=not args.quiet,
                   params=TrainParams(name="demo", epochs=args.epochs))
    kinds = Counter(f.kind for f in res.missed)
    print(f"\nInjected faults: {len(res.caught) + len(res.missed)} in {res.streams} streams "
          f"({res.readings} readings streamed)")
    for fault, delay, kind in sorted(res.caught, key=lambda c: c[0].stream):
        print(f"  caught  {fault.stream:<10} {fault.kind:<12} sensors={','.join(fault.features):<24} "
              f"after {delay / 60:6.0f} min  ({kind} alert)")
    for fault in res.missed:
        print(f"  MISSED  {fault.stream:<10} {fault.kind:<12} sensors={','.join(fault.features)}")
    for a in res.false_alerts:
        what = (f"score={a['score']:.2f}" if a["kind"] == "anomaly" else f"{a['reason']}")
        print(f"  FALSE   {a['stream']:<10} {a['kind']} raised at {a['first_seen']} {what} "
              f"top={a['top_features'][0]['name']}")
    if kinds:
        print("  missed by kind: " + ", ".join(f"{k}={n}" for k, n in sorted(kinds.items())))
    n_regimes = len(res.regimes_detected) + len(res.regimes_missed)
    print(f"Regime changes (operating point moved for good, not a fault): {n_regimes}")
    for shift, delay in res.regimes_detected:
        n = sum(a["stream"] == shift.stream for a in res.regime_alerts)
        print(f"  detected {shift.stream:<10} sensors={','.join(shift.features):<24} after {delay / 60:6.0f} min  "
              f"(regime_change event; {n} anomaly alert{'s' if n != 1 else ''} raised on it, not counted false)")
    for shift in res.regimes_missed:
        print(f"  MISSED   {shift.stream:<10} sensors={','.join(shift.features)}")
    if res.other_regime_events:
        print(f"  regime_change events on other streams: {len(res.other_regime_events)}, "
              f"{res.fault_regime_events} of them during an injected fault")
    print(f"Alerts published: {len(res.alerts)} (raise, escalate and clear) in {res.seconds:.0f} s")
    if args.out:
        print(f"Model and alerts written to {args.out}/")
    print(res.summary_line())
    return 0


def _train(args: argparse.Namespace) -> int:
    from detector.artifact import save_artifact
    from detector.train import TrainParams, load_series, train_model

    feats = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
    if (args.data is None) == (args.from_topic is None):
        print("error: train needs --data FILE or --from-topic TOPIC (one of them)", file=sys.stderr)
        return 2
    if args.data is not None:
        series = load_series(args.data, feats, ts_col=args.timestamp_col, stream_col=args.stream_col)
        source: dict[str, object] = {"file": str(args.data)}
    else:
        series, source = _series_from_topic(args, feats)
    log.info("training on %s: %d streams, %d readings, features %s", args.data or f"topic {args.from_topic}",
             len(series.streams), sum(len(v) for v in series.values), ",".join(series.features))
    params = TrainParams(window=args.window, hop=args.hop, hidden_size=args.hidden, num_layers=args.layers,
                         epochs=args.epochs, lr=args.lr, patience=args.patience, seed=args.seed,
                         score_aggregate=args.score, corrupt=args.corrupt, error_scale=args.error_scale,
                         covariance=args.covariance, smooth_halflife=args.smooth_halflife,
                         holdout_blocks=args.holdout_blocks, relations=args.relations,
                         relation_tails=args.relation_tails, relation_holdout=args.relation_holdout,
                         forecast=args.forecast, stream_scale=args.stream_scale, spikes=args.spikes,
                         spike_score=args.spike_score, name=args.name or Path(args.out).name)
    ckpt = Path(args.out) / "checkpoint"
    if not args.resume and (ckpt / "state.json").is_file():
        log.warning("%s holds a checkpoint of an earlier run; starting afresh (--resume goes on from it)", ckpt)
    model, manifest = train_model(series, params, progress=not args.quiet, checkpoint=ckpt, resume=args.resume)
    manifest.training["source"] = source
    out = save_artifact(args.out, model, manifest)
    shutil.rmtree(ckpt, ignore_errors=True)  # the model is written: nothing left to resume
    print(f"model written to {out}/ ({manifest.training['epochs_run']} epochs, best validation loss "
          f"{manifest.training['best_val_loss']:.4f}, calibrated p99.9 score {manifest.quantile(0.999):.3f})")
    return 0


def _series_from_topic(args: argparse.Namespace, feats: list[str] | None) -> tuple[Any, dict[str, object]]:
    """The training series read from the input topic over --since/--until, less alerted spans; and its source."""
    import time

    from detector.config import Config, load_config
    from detector.control import parse_since
    from detector.history import alerted_spans, features_in, series_from_records

    cfg = load_config(args.config) if args.config else Config()
    now = time.time()
    try:
        since = parse_since(args.since, now)
        until = parse_since(args.until, now) if args.until else None
    except ValueError as exc:
        raise DataError(f"--since/--until: {exc}") from None
    if until is not None and until <= since:
        raise DataError(f"--until ({args.until}) must be after --since ({args.since})")
    span = (int(since * 1000), None if until is None else int(until * 1000))
    records = _read_topic(cfg, args.from_topic, *span, args.config)
    features = feats or features_in(records, cfg.input)
    if not features:
        raise DataError(f"topic {args.from_topic}: no readings between {args.since} and {args.until or 'now'} "
                        f"({len(records)} records)")
    spans = alerted_spans(_read_topic(cfg, args.exclude_alerted, *span, args.config), until or now) \
        if args.exclude_alerted else {}
    control = None
    if args.exclude_muted:  # a mute written before the span may hold in it
        if not cfg.control.enabled:
            raise DataError("--exclude-muted: control.enabled is false in --config, so there is no control topic")
        control = _read_topic(cfg, cfg.control_topic(), 0, None, args.config)  # small, compacted: all of it
    got = series_from_records(records, features, cfg.input, spans, control)
    log.info("read %d records of %s: %d readings kept, %d rejected %s, %d repeated, %d inside alerted or muted "
             "spans", got.records, args.from_topic, got.readings, sum(got.rejected.values()), got.rejected or "",
             got.duplicates, got.excluded)
    return got.series, {"topic": args.from_topic, "bootstrap_servers": cfg.kafka.bootstrap_servers,
                        "since": since, "until": until if until is not None else now, "records": got.records,
                        "readings": got.readings, "rejected": got.rejected, "repeated": got.duplicates,
                        "alerts_topic": args.exclude_alerted, "alerted_readings_left_out": got.excluded,
                        "control_topic": cfg.control_topic() if args.exclude_muted else None,
                        "muted_spans": got.muted_spans}


def _evaluate_labels(args: argparse.Namespace) -> int:
    """`evaluate --labels-from-topic`: the live and shadow alerts against operators' labels."""
    import time

    from detector.compare import format_labels, labels_held, score_labels
    from detector.config import Config, load_config
    from detector.control import parse_since

    cfg = load_config(args.config) if args.config else Config()
    if not cfg.control.enabled:
        raise DataError("--labels-from-topic: control.enabled is false in --config, so there is no control topic")
    now = time.time()
    try:
        since = int(parse_since(args.since, now) * 1000)
    except ValueError as exc:
        raise DataError(f"--since: {exc}") from None
    labels = labels_held(_read_topic(cfg, cfg.control_topic(), 0, None, args.config))
    sides = {}
    for name, topic in (("live", cfg.output.alerts_topic), ("shadow", cfg.shadow_alerts_topic())):
        if name == "shadow" and not cfg.model.shadow:
            continue
        sides[name] = _read_json(cfg, topic, since, args.config)
    result = score_labels(labels, sides, now)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"labels of {cfg.control_topic()}; alerts since {args.since}: "
              + ", ".join(f"{n} {t}" for n, t in (("live", cfg.output.alerts_topic),
                                                 ("shadow", cfg.shadow_alerts_topic())) if n in sides))
        print(format_labels(result))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.labels_from_topic:
        return _evaluate_labels(args)
    if not (args.data and args.format and args.out):
        raise DataError("evaluate needs --data, --format and --out (or --labels-from-topic)")
    from dataclasses import replace

    from detector.config import Config, load_config
    from detector.datasets import load_dataset, load_labelled_csv, load_skab_anomaly_free
    from detector.evaluate import EVAL_PARAMS, evaluate, seed_spread
    from detector.pretrain import pretrained

    if args.format == "csv":
        feats = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
        files = load_labelled_csv(args.data, timestamp_col=args.timestamp_col, label_col=args.label_col,
                                  features=feats, train_rows=args.train_rows)
    else:
        files = load_dataset(args.data, args.format)
    if args.match:
        files = [f for f in files if args.match in f.name]
    if args.limit:
        files = files[: args.limit]
    cfg = load_config(args.config) if args.config else Config()
    params = replace(EVAL_PARAMS, window=args.window, hop=args.hop, hidden_size=args.hidden, epochs=args.epochs,
                     score_aggregate=args.score, corrupt=args.corrupt, error_scale=args.error_scale,
                     covariance=args.covariance, smooth_halflife=args.smooth_halflife,
                     holdout_blocks=args.holdout_blocks, relations=args.relations,
                     relation_tails=args.relation_tails, relation_holdout=args.relation_holdout,
                     forecast=args.forecast, stream_scale=args.stream_scale, spikes=args.spikes,
                     spike_score=args.spike_score)
    logging.getLogger("detector.daemon").setLevel(logging.ERROR)  # alerts and rejects are in the report
    pretrain = None
    if args.train_protocol == "anomaly-free":
        if args.format != "skab":
            print("error: --train-protocol anomaly-free is for --format skab (it trains on anomaly-free.csv)",
                  file=sys.stderr)
            return 2
        pretrain = load_skab_anomaly_free(args.data)
    pretrain_synthetic = args.train_protocol == "pretrained" and not args.model
    if pretrain_synthetic:
        widths = {len(f.features) for f in files}
        if len(widths) > 1:
            print(f"error: --train-protocol pretrained needs files of one width; these have {sorted(widths)} "
                  "features", file=sys.stderr)
            return 2
    seeds = list(dict.fromkeys(args.seed))
    summaries = []
    for seed in seeds:
        out = args.out if len(seeds) == 1 else str(Path(args.out) / f"seed-{seed}")
        p = replace(params, seed=seed)
        init = pretrained(list(files[0].features), p) if pretrain_synthetic else None
        summary = evaluate(files, args.format, out, cfg, p, model_dir=args.model, pretrain=pretrain, init=init,
                           progress=not args.quiet,
                           baselines=() if args.no_baselines else ("hst", "pca"), plots=not args.no_plots)
        summaries.append(summary)
        print(f"{len(files)} files, {summary['seconds']:.0f} s; written to {out}/ "
              "(summary.json, scores/, report.html)" + (f" [seed {seed}]" if len(seeds) > 1 else ""))
        lines = [("ours", summary["overall"])] + [(b, v["overall"]) for b, v in summary["baselines"].items()]
        for name, ov in lines:
            print(f"  {name:5s} {_overall_line(ov)}")
    if len(seeds) > 1:
        spread = seed_spread(summaries, seeds)
        (Path(args.out) / "seeds.json").write_text(json.dumps(spread, indent=2), encoding="utf-8")
        means = {k: v["mean"] for k, v in spread["ours"].items()}
        print(f"{len(seeds)} seeds; mean, written to {args.out}/seeds.json: " + " ".join(
            f"{k}={v:.3f}" if abs(v) < 10 else f"{k}={v:.1f}" for k, v in means.items()))
    return 0


def _overall_line(ov: dict) -> str:
    """One run's overall figures on one line."""
    nab = ov.get("nab")
    profiles = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
    extra = (" nab=" + "/".join(f"{nab[p]:.1f}" for p in profiles)
             + " nab_alerts=" + "/".join(f"{ov['nab_alerts'][p]:.1f}" for p in profiles)) if nab else ""
    if "attribution" in ov:
        extra += f" attribution={ov['attribution']['right']}/{ov['attribution']['alerts']}"
    return (f"f1={ov['f1']:.3f} precision={ov['precision']:.3f} recall={ov['recall']:.3f} far={ov['far']:.3f} "
            f"mar={ov['mar']:.3f} event_f1={ov['event_f1']:.3f}{extra}")


def _topics(args: argparse.Namespace) -> int:
    """Create the topics a config names (or the ones given), where missing; print each with its partitions."""
    from kafka.errors import KafkaError

    from consumers.kafka import TopicError, create_topics
    from detector.config import load_config
    from detector.daemon import kafka_client_settings

    if args.partitions == 0 or args.partitions < -1 or args.replication == 0 or args.replication < -1:
        print("error: --partitions and --replication must be at least 1 (or -1: the broker's default)", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    names = args.names or [*cfg.input.topics, cfg.output.alerts_topic, cfg.output.dead_letter_topic,
                           *([cfg.output.scores_topic] if cfg.output.scores_topic else []),
                           *([cfg.shadow_alerts_topic()] if cfg.model.shadow else [])]
    try:
        done = create_topics(cfg.kafka.bootstrap_servers, list(dict.fromkeys(names)), args.partitions,
                             args.replication, client=kafka_client_settings(cfg))
    except (KafkaError, TopicError) as exc:
        print(f"error: {args.config}: kafka.bootstrap_servers {cfg.kafka.bootstrap_servers}: {exc}", file=sys.stderr)
        return 1
    for name, (created, partitions) in done.items():
        print(f"{name}: {'created' if created else 'exists'}, {partitions} partition{'s' if partitions != 1 else ''}")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from detector.config import config_schema, load_config

    if args.schema:
        import json

        print(json.dumps(config_schema(), indent=2))
        return 0

    cfg = load_config(args.config)
    print(f"{args.config}: valid")
    if args.model:
        from detector.artifact import check_features, check_shadow, load_artifact
        from detector.engine import Engine, pick_device

        art = load_artifact(cfg.model.path)
        check_features(art, cfg.model.features)
        device = pick_device(cfg.model.device)
        engine = Engine(art, device=device, capacity=1, precision=cfg.model.precision)  # runs the model once there
        print(f"{cfg.model.path}: model {art.manifest.name} with features {','.join(art.manifest.features)}; "
              f"runs on {device} in {engine.precision}")
        if cfg.model.shadow:
            shadow = load_artifact(cfg.model.shadow)
            check_shadow(shadow, art)
            Engine(shadow, device=device, capacity=1, precision=cfg.model.precision)
            print(f"{cfg.model.shadow}: shadow model {shadow.manifest.name}; its alerts go to "
                  f"{cfg.shadow_alerts_topic()}")
    if args.kafka:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        from detector.daemon import kafka_client_settings

        try:
            admin = KafkaAdminClient(bootstrap_servers=cfg.kafka.bootstrap_servers, **kafka_client_settings(cfg))
            topics = set(admin.list_topics())
            admin.close()
        except KafkaError as exc:
            print(f"{args.config}: kafka.bootstrap_servers: cannot reach Kafka at {cfg.kafka.bootstrap_servers} "
                  f"({type(exc).__name__})")
            return 1
        wanted = [*cfg.input.topics, cfg.output.alerts_topic, cfg.output.dead_letter_topic,
                  *([cfg.shadow_alerts_topic()] if cfg.model.shadow else [])]
        missing = [t for t in wanted if t not in topics]
        if missing:
            print(f"{args.config}: topic(s) not found on {cfg.kafka.bootstrap_servers}: {', '.join(missing)}")
            return 1
        print(f"{cfg.kafka.bootstrap_servers}: reachable; topics present")
    return 0


def _control(args: argparse.Namespace) -> int:
    import getpass
    import socket
    import time

    from kafka.errors import KafkaError

    from consumers.kafka import ControlTopic, ControlTopicError
    from detector.artifact import load_artifact
    from detector.config import load_config
    from detector.control import Command, encode_command, parse_until
    from detector.daemon import kafka_client_settings

    cfg = load_config(args.config)
    if not cfg.control.enabled:
        print(f"error: {args.config}: control.enabled is false: the daemons read no control topic", file=sys.stderr)
        return 2
    now = time.time()
    until = None
    model_action = args.action in ("promote", "rollback")
    if model_action == (args.streams is not None):
        print(f"error: {args.action} " + ("takes no streams: it is for every stream" if model_action else
                                          "needs the streams: a stream id or a glob on it"), file=sys.stderr)
        return 2
    if args.version is not None and args.action != "promote":
        print(f"error: --version is for promote only, not {args.action}", file=sys.stderr)
        return 2
    version = ""
    if args.action == "promote":
        version = args.version or ""
        if not version:
            if not cfg.model.shadow:
                print(f"error: {args.config}: model.shadow is not set: there is no shadow model to promote "
                      f"(or give --version)", file=sys.stderr)
                return 2
            try:
                version = load_artifact(cfg.model.shadow).manifest.model_version
            except DetectorError as exc:
                print(f"error: {args.config}: model.shadow: {exc}", file=sys.stderr)
                return 2
    if (args.action == "label") != (args.alert_id is not None and args.label is not None):
        print("error: label needs --alert-id and --as (and they are for label only)", file=sys.stderr)
        return 2
    if args.until is not None:
        if args.action != "mute":
            print(f"error: --until is for mute only, not {args.action}", file=sys.stderr)
            return 2
        try:
            until = parse_until(args.until, now)
        except ValueError as exc:
            print(f"error: --until: {exc}", file=sys.stderr)
            return 2
        if until <= now:
            print(f"error: --until {args.until!r} is in the past", file=sys.stderr)
            return 2
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no user name in this environment
        user = "unknown"
    by = args.by or f"{user}@{socket.gethostname()}"
    key, value = encode_command(Command(args.action, "*" if model_action else args.streams, until, args.reason, by,
                                        alert_id=args.alert_id or "", label=args.label or "", note=args.note,
                                        version=version))
    topic = ControlTopic(cfg.kafka.bootstrap_servers, cfg.control_topic(), client=kafka_client_settings(cfg))
    try:
        topic.ensure(cfg.control.replication)
        partition, offset = topic.send(key, value)
    except ControlTopicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(f"error: {args.config}: kafka.bootstrap_servers: cannot write to {cfg.control_topic()} at "
              f"{cfg.kafka.bootstrap_servers} ({type(exc).__name__})", file=sys.stderr)
        return 1
    print(f"sent to {cfg.control_topic()}[{partition}]@{offset}: key={key.decode()} {value.decode()}")
    return 0


def _read_topic(cfg: Any, topic: str, since_ms: int, until_ms: int | None, config_path: str | None) -> list:
    """The records of `topic` in [since_ms, until_ms) by record time; DataError naming the topic and the brokers."""
    from kafka.errors import KafkaError

    from consumers.kafka import read_span
    from detector.daemon import kafka_client_settings

    where = f"kafka.bootstrap_servers in {config_path or 'the default config'}"
    try:
        return [r for chunk in read_span(cfg.kafka.bootstrap_servers, topic, since_ms, until_ms,
                                         client=kafka_client_settings(cfg)) for r in chunk]
    except LookupError as exc:
        raise DataError(f"{exc} ({where})") from None
    except KafkaError as exc:
        raise DataError(f"cannot read topic {topic} at {cfg.kafka.bootstrap_servers} ({type(exc).__name__}; "
                        f"{where})") from None


def _read_json(cfg: Any, topic: str, since_ms: int, config_path: str | None) -> list[dict]:
    """The JSON objects on `topic` from `since_ms` (record time) on; other records are left out."""
    import orjson

    out = []
    for r in _read_topic(cfg, topic, since_ms, None, config_path):
        try:
            doc = orjson.loads(r.value or b"")
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def _compare(args: argparse.Namespace) -> int:
    import time

    from detector.compare import compare_alerts, format_comparison
    from detector.config import Config, load_config
    from detector.control import parse_since

    cfg = load_config(args.config) if args.config else Config()
    live_topic = args.live or cfg.output.alerts_topic
    shadow_topic = args.shadow or cfg.shadow_alerts_topic()
    try:
        since = int(parse_since(args.since, time.time()) * 1000)
    except ValueError as exc:
        raise DataError(f"--since: {exc}") from None
    result = compare_alerts(*(_read_json(cfg, topic, since, args.config) for topic in (live_topic, shadow_topic)))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"alerts since {args.since}: live {live_topic}, shadow {shadow_topic}")
        print(format_comparison(result))
    return 0


def _run(args: argparse.Namespace) -> int:
    import threading

    from detector.signals import install_signals

    stop, reload = threading.Event(), threading.Event()
    install_signals(stop, reload)  # before torch loads (seconds): a SIGTERM meanwhile still exits 0
    from detector.config import load_config
    from detector.logs import setup_logging

    cfg = load_config(args.config)
    setup_logging(cfg.runtime.log_level, cfg.runtime.log_format)
    logging.getLogger("detector.cli").info("detector %s starting, config %s", __version__, args.config)
    from detector.daemon import run_daemon

    return run_daemon(cfg, stop=stop, config_path=args.config, reload=reload)


def _simulate(args: argparse.Namespace) -> int:
    import contextlib
    import signal

    from detector.loadgen import SimulateParams, publish

    start = None
    if args.start != "now":
        from datetime import datetime

        try:
            start = float(args.start)
        except ValueError:
            try:
                start = datetime.fromisoformat(args.start.replace("Z", "+00:00")).timestamp()
            except ValueError:
                print(f"error: --start: {args.start!r} is not now, epoch seconds or RFC 3339", file=sys.stderr)
                return 2
    params = SimulateParams(streams=args.streams, features=args.features, rate=args.rate, readings=args.readings,
                            duration=args.duration, faults=args.faults, normal=args.normal, chunk=args.chunk,
                            step=args.step, start=start, seed=args.seed, per_message=args.per_message,
                            form=args.form)
    params.check()
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)  # stop after the slice in hand, flush, write the truth of faults under way
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C interrupts at once

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with contextlib.ExitStack() as stack:
            truth = stack.enter_context(open(args.truth, "w", encoding="utf-8")) if args.truth else None
            log.info("simulate: %d streams x %d sensors to %s on %s at %s readings/s%s", params.streams,
                     params.features, args.topic, args.bootstrap, f"{params.rate:g}" if params.rate else "max",
                     f"; ground truth in {args.truth}" if args.truth else "")
            result = publish(params, args.bootstrap, args.topic, truth, stop=lambda: bool(stopping))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(result.summary_line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `detector` command."""
    p = argparse.ArgumentParser(prog="detector", description="Streaming sensor anomaly detector.")
    p.add_argument("--version", action="version", version=f"detector {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="simulate a fleet with faults, train, stream and report what was caught")
    d.add_argument("--streams", type=int, default=50)
    d.add_argument("--features", type=int, default=8)
    d.add_argument("--readings", type=int, default=3600, help="readings per stream (one a minute)")
    d.add_argument("--normal", type=int, default=1800, help="fault-free readings per stream to train on")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--epochs", type=int, default=30, help="most training epochs (early stopping may end sooner)")
    d.add_argument("--out", help="folder for the trained model and the alerts (JSON lines)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="train an LSTM autoencoder on normal data")
    t.add_argument("--data", help="CSV or Parquet: timestamp, stream id, one column per feature")
    t.add_argument("--from-topic", metavar="TOPIC",
                   help="instead of --data: read the readings (any of the three forms) from this Kafka topic over "
                   "--since/--until by record time, through kafka.* and input.* of --config")
    t.add_argument("--since", default="14d",
                   help="with --from-topic: where the span starts, a duration before now (14d, 36h) or a time "
                   "(RFC 3339 or epoch seconds); default 14d")
    t.add_argument("--until", help="with --from-topic: where the span ends (default: now)")
    t.add_argument("--exclude-alerted", metavar="ALERTS_TOPIC",
                   help="with --from-topic: leave out each stream's readings inside its anomaly and sensor-fault "
                   "episodes on this alerts topic (raised to cleared)")
    t.add_argument("--exclude-muted", action="store_true",
                   help="with --from-topic: also leave out each stream's readings while operators held it muted, "
                   "from the control topic of --config (control.topic)")
    t.add_argument("--config", help="with --from-topic: the YAML config naming the brokers and the input fields")
    t.add_argument("--out", required=True, help="folder to write the model into")
    t.add_argument("--features", help="comma-separated feature columns (default: every numeric column)")
    t.add_argument("--timestamp-col", default="timestamp")
    t.add_argument("--stream-col", default="stream")
    t.add_argument("--window", type=int, default=32)
    t.add_argument("--hop", type=int, default=8)
    t.add_argument("--hidden", type=int, default=48)
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--patience", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--corrupt", type=float, default=0.0,
                   help="denoising: share of training chunks given a synthetic fault (0 = off)")
    t.add_argument("--score", choices=["max", "mean"], default="max",
                   help="window score: the largest normalised error (default) or the mean over the window's tail")
    t.add_argument("--error-scale", choices=["calibration", "input"], default="input",
                   help="input (default): errors in units of the feature's training spread; calibration: each "
                   "feature's error standardised by its spread on validation rows")
    t.add_argument("--covariance", choices=["diagonal", "full"], default="diagonal",
                   help="diagonal: a reading's score is its largest squared standardised error; full: the "
                   "Mahalanobis distance of its error vector under the calibration errors' correlation")
    t.add_argument("--smooth-halflife", type=float, default=0.0,
                   help="readings; > 0: a smoothed score (exponentially weighted mean of each sensor's error) beside "
                   "the window's own, for small lasting faults (0: off)")
    t.add_argument("--holdout-blocks", type=int, default=1,
                   help="cycles of trained-on, validation and calibration rows through each stream's span (1: the "
                   "last 30%% held back; more, e.g. 4: held-back rows spread over the whole period)")
    t.add_argument("--relations", action=argparse.BooleanOptionalAction, default=True,
                   help="a cross-sensor relation score beside the model's: each sensor predicted from the others "
                   "on its stream's own scale (streams in the training data only; needs two or more features; "
                   "on by default, --no-relations turns it off)")
    t.add_argument("--relation-tails", action=argparse.BooleanOptionalAction, default=False,
                   help="judge each sensor's relation residual against its own tail on the trained-on rows "
                   "(a sensor whose residual runs wide in normal operation no longer sets the level for all)")
    t.add_argument("--relation-holdout", type=float, default=1.5, metavar="RMS",
                   help="score only the relations that hold on the validation rows (held out in time): a sensor "
                   "whose residual there has an rms above RMS fitted spreads is not scored (default 1.5; 0: every "
                   "sensor)")
    t.add_argument("--forecast", action=argparse.BooleanOptionalAction, default=False,
                   help="a head that predicts each next reading from the encoder's state, trained with the model, "
                   "and a forecast score beside the window's (a jump or spike shows at the reading itself)")
    t.add_argument("--stream-scale", action=argparse.BooleanOptionalAction, default=False,
                   help="the model sees each training stream on its own scale (its mean and spread over its trained-on "
                   "rows), so unlike machines share one model; streams not in the training data are seen on the "
                   "fleet's scale")
    t.add_argument("--spikes", action=argparse.BooleanOptionalAction, default=True,
                   help="a spike score: a sensor's reading beyond the medians of its neighbours on both sides, in "
                   "noise spreads, while the stream's other sensors hold, raises at once (judged six readings late, "
                   "when both sides are in; on by default, --no-spikes turns it off)")
    t.add_argument("--spike-score", action=argparse.BooleanOptionalAction, default=False,
                   help="with --spikes: the excursion also enters the window score, as (excursion / level)^2 x the "
                   "calibrated 0.999 window score (published scores, k of n and escalation then see spikes too)")
    t.add_argument("--resume", action="store_true",
                   help="go on from the checkpoint a stopped run left in OUT/checkpoint/ (written after every "
                   "epoch; same data and options required)")
    t.add_argument("--name", help="model name carried in alerts (default: the --out folder's name)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="score the detector and baselines on labelled data (NAB, SKAB, CSV)")
    e.add_argument("--labels-from-topic", action="store_true",
                   help="instead of a dataset: score the live alerts (and the shadow's, with model.shadow) of "
                   "--config against operators' labels in its control topic (detector control label), over --since")
    e.add_argument("--since", default="30d", help="with --labels-from-topic: the alerts read, a duration before "
                   "now (30d) or a time; default 30d")
    e.add_argument("--json", action="store_true", help="with --labels-from-topic: print the report as JSON")
    e.add_argument("--data", help="the dataset folder (nab, skab), or a CSV file or folder (csv); "
                   "skab: one folder of experiments (e.g. SKAB/valve1) or the SKAB folder for all of them "
                   "(valve1, valve2, other; not anomaly-free)")
    e.add_argument("--format", choices=["nab", "skab", "csv"])
    e.add_argument("--out", help="folder for summary.json, scores/ and report.html")
    e.add_argument("--model", help="a trained model folder to use for every file (default: train one per file "
                   "on the protocol's training rows)")
    e.add_argument("--train-protocol", choices=["per-file", "pretrained", "anomaly-free"], default="per-file",
                   help="per-file: train on each file's protocol rows (default); pretrained: the same, starting "
                   "from a model first fitted on synthetic signals (no benchmark data, about a minute); "
                   "anomaly-free (skab): train one model on SKAB's anomaly-free.csv and use it for every file "
                   "(a separate variant)")
    e.add_argument("--config", help="config file whose thresholds, alerts and scoring sections apply "
                   "(default: defaults)")
    e.add_argument("--match", help="only files whose name (path in the dataset) contains this text")
    e.add_argument("--limit", type=int, help="only the first N files (after --match)")
    e.add_argument("--timestamp-col", default="timestamp", help="csv: the timestamp column")
    e.add_argument("--label-col", default="label", help="csv: the 0/1 label column")
    e.add_argument("--features", help="csv: comma-separated feature columns (default: every other numeric one)")
    e.add_argument("--train-rows", type=int, help="csv: leading rows to learn from (default: 15%%)")
    e.add_argument("--window", type=int, default=16)
    e.add_argument("--hop", type=int, default=4)
    e.add_argument("--hidden", type=int, default=32)
    e.add_argument("--epochs", type=int, default=20)
    e.add_argument("--seed", type=int, nargs="+", default=[0], help="training seed; several (e.g. --seed 0 1 2) "
                   "run the whole evaluation once per seed into DIR/seed-N/ and write the spread to DIR/seeds.json")
    e.add_argument("--score", choices=["max", "mean"], default="max", help="window score (see `train --score`)")
    e.add_argument("--error-scale", choices=["calibration", "input"], default="input",
                   help="see `train --error-scale`")
    e.add_argument("--covariance", choices=["diagonal", "full"], default="diagonal",
                   help="see `train --covariance`")
    e.add_argument("--smooth-halflife", type=float, default=0.0, help="see `train --smooth-halflife`")
    e.add_argument("--holdout-blocks", type=int, default=1, help="see `train --holdout-blocks`")
    e.add_argument("--relations", action=argparse.BooleanOptionalAction, default=True,
                   help="see `train --relations`")
    e.add_argument("--relation-tails", action=argparse.BooleanOptionalAction, default=False,
                   help="see `train --relation-tails`")
    e.add_argument("--relation-holdout", type=float, default=1.5, metavar="RMS",
                   help="see `train --relation-holdout`")
    e.add_argument("--forecast", action=argparse.BooleanOptionalAction, default=False,
                   help="see `train --forecast`")
    e.add_argument("--spikes", action=argparse.BooleanOptionalAction, default=True,
                   help="see `train --spikes`")
    e.add_argument("--spike-score", action=argparse.BooleanOptionalAction, default=False,
                   help="see `train --spike-score`")
    e.add_argument("--stream-scale", action=argparse.BooleanOptionalAction, default=False,
                   help="see `train --stream-scale`")
    e.add_argument("--corrupt", type=float, default=0.0, help="denoising: share of training chunks given a "
                   "synthetic fault (see `train --corrupt`)")
    e.add_argument("--no-baselines", action="store_true", help="skip river HalfSpaceTrees and PCA")
    e.add_argument("--no-plots", action="store_true", help="report.html without per-file plots")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_evaluate)

    r = sub.add_parser("run", help="run the daemon: Kafka in, alerts out")
    r.add_argument("--config", default="config.yaml")
    r.set_defaults(func=_run)

    m = sub.add_parser("simulate", help="publish the demo's simulated fleet (faults included) to Kafka at a target "
                       "rate, with a ground-truth file of the injected faults")
    m.add_argument("--bootstrap", required=True, help="HOST:PORT[,HOST:PORT...] of the Kafka brokers")
    m.add_argument("--topic", default="sensor-readings", help="input topic of the daemon (must exist)")
    m.add_argument("--streams", type=int, default=50, help="machines (streams), pump-000, pump-001, ...")
    m.add_argument("--features", type=int, default=8, help="sensors per machine (1 to 8, the demo's order)")
    m.add_argument("--rate", type=float, default=1000.0,
                   help="readings per second, all streams together (0: as fast as Kafka takes them)")
    stop_after = m.add_mutually_exclusive_group()
    stop_after.add_argument("--duration", type=float, help="stop after this many seconds (default: run until "
                            "SIGTERM or Ctrl+C)")
    stop_after.add_argument("--readings", type=int, help="stop after this many readings in all")
    m.add_argument("--faults", type=float, default=0.5,
                   help="share of the streams given one fault in each chunk of --chunk steps")
    m.add_argument("--normal", type=int, default=240, help="fault-free steps at the start of the run")
    m.add_argument("--chunk", type=int, default=1440,
                   help="steps simulated at a time; later chunks replay the machines with new faults")
    m.add_argument("--start", default="now", help="event time of the first step: now (each step stamped with "
                   "the wall clock as it goes out), or epoch seconds / RFC 3339 (steps --step seconds apart)")
    m.add_argument("--step", type=float, default=60.0, help="seconds between a stream's readings, with --start")
    m.add_argument("--truth", help="write the injected faults here, one JSON object a line")
    m.add_argument("--seed", type=int, default=7, help="the fleet's seed (the demo's default is 7)")
    m.add_argument("--per-message", type=int, default=1, help="readings of one stream per message: more than 1 "
                   "sends the batched form (a stream's readings wait until it has this many)")
    m.add_argument("--form", choices=["list", "columns"], default="list",
                   help="the batched form, with --per-message above 1: a list of readings, or one list per field")
    m.set_defaults(func=_simulate)

    cmp = sub.add_parser("compare", help="the live model's alerts beside the shadow model's (model.shadow)")
    cmp.add_argument("--live", help="the live alerts topic (default: output.alerts_topic of --config)")
    cmp.add_argument("--shadow", help="the shadow's alerts topic (default: the live one + -shadow)")
    cmp.add_argument("--since", default="24h", help="from this record time: a duration before now (24h, 7d) or a "
                     "time (RFC 3339 or epoch seconds); default 24h")
    cmp.add_argument("--config", help="the YAML config naming the brokers and the alerts topic")
    cmp.add_argument("--json", action="store_true", help="print the comparison as JSON")
    cmp.set_defaults(func=_compare)

    k = sub.add_parser("control", help="mute, unmute, acknowledge or label on the running daemons (control topic)")
    k.add_argument("action", choices=["mute", "unmute", "ack", "label", "promote", "rollback"],
                   help="mute: no anomaly alerts (open ones are cleared); unmute: alerts again; ack: acknowledge "
                   "the open alert of each matching stream (no escalation is announced after it); label: say what "
                   "one alert was (--alert-id, --as): a false alarm raises that stream's levels by 25 %%, at most "
                   "to twice; promote: make the shadow model (model.shadow) live, the live one its shadow; "
                   "rollback: make model.path's model live again")
    k.add_argument("streams", nargs="?", help="a stream id or a glob on it, e.g. pump-17 or 'pump-0*' (not for "
                   "promote and rollback: every stream)")
    k.add_argument("--version", help="promote: the model_version made live (default: that of model.shadow in "
                   "--config)")
    k.add_argument("--until", help="mute: until this time (RFC 3339, epoch seconds, or a duration from now such "
                   "as 30m, 2h, 1d); default: until unmuted")
    k.add_argument("--reason", default="", help="why, carried in the command and the alert it produces")
    k.add_argument("--by", help="who (default: user@host)")
    k.add_argument("--alert-id", help="label: the alert_id of the alert labelled")
    k.add_argument("--as", dest="label", choices=["false_alarm", "confirmed"], help="label: what the alert was")
    k.add_argument("--note", default="", help="label: a note kept with the label")
    k.add_argument("--config", default="config.yaml")
    k.set_defaults(func=_control)

    tp = sub.add_parser("topics", help="create the Kafka topics a config names (input, alerts, dead letters, scores), "
                        "where missing")
    tp.add_argument("action", choices=["create"], help="create: make each topic that does not exist yet (an existing "
                    "one is left as it is)")
    tp.add_argument("names", nargs="*", help="topics to create instead of the config's")
    tp.add_argument("--partitions", type=int, default=-1, help="partitions of each new topic (default: the broker's "
                    "num.partitions); the daemons of one group share these out, so make it at least their number")
    tp.add_argument("--replication", type=int, default=-1, help="replication factor of each new topic (default: the "
                    "broker's)")
    tp.add_argument("--config", default="config.yaml", help="the YAML config naming the brokers and the topics")
    tp.set_defaults(func=_topics)

    c = sub.add_parser("check-config", help="validate a config file and print every error")
    c.add_argument("config", nargs="?", default="config.yaml")
    c.add_argument("--model", action="store_true", help="also load the model folder it names")
    c.add_argument("--kafka", action="store_true", help="also check that Kafka and the topics are reachable")
    c.add_argument("--schema", action="store_true", help="print the JSON Schema of the config file and exit")
    c.set_defaults(func=_check_config)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `detector` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command != "run":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
        logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {exc.path}: {problem}", file=sys.stderr)
        return 2
    except DetectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
