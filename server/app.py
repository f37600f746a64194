"""The fedbrats ServerApp: waits for the sites, then runs the protocol.

1. ``query.info`` to every site: population, case counts, data checks.
2. Phase 1, ``train.teacher``: every site trains its teacher, in parallel; metrics come back.
   With ``teacher-warm-rounds``, ``train.warm`` rounds first average the teacher network over
   the sites (FedAvg on labels) and each teacher then starts from that network.
3. Phase 2, distillation rounds with a Flower strategy (FedAvg by default; FedProx, FedAdam);
   replies are weighted equally per population (or by training cases). The global student is
   saved after every round; a restarted run goes on from the last saved round.
4. ``evaluate.final``: the final student beside each site's teacher; the report is written.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from logging import DEBUG, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedbrats.common import wire
from fedbrats.common.config import RunConfig, load_run_config
from fedbrats.common.networks.models import expand_to_heads
from fedbrats.common.utils.code import code_location
from fedbrats.server.protocol import (
    check_resumable,
    initial_student_arrays,
    parse_scores,
    teacher_arrays_in,
)
from fedbrats.server.state import RunFolder
from fedbrats.server.strategy import build_strategy

app = ServerApp()

LONG_TIMEOUT_S = 7 * 24 * 3600.0


def _wait_for_sites(grid: Grid, n: int, timeout_s: float = 600.0) -> list[int]:
    start = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"waited {timeout_s:.0f} s for {n} sites, {len(nodes)} connected")
        time.sleep(1.0)


def _send(grid: Grid, nodes: list[int], message_type: str, content_fn, timeout: float,
          folder: RunFolder, phase: str, names: dict[int, str] | None = None
          ) -> dict[int, Message]:
    """Send ``content_fn()`` to every node, wait; audit each reply; the replies without error."""
    messages = [Message(content_fn(), dst_node_id=n, message_type=message_type) for n in nodes]
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=timeout)}
    for node in nodes:
        reply = replies.get(node)
        site = (names or {}).get(node, str(node))
        if reply is None:
            log(WARNING, "%s: no reply from site %s", phase, site)
            continue
        if reply.has_error():
            log(WARNING, "%s: site %s failed: %s", phase, site, reply.error.reason)
            folder.audit(phase=phase, site=site, error=reply.error.reason)
            continue
        folder.audit(phase=phase, site=site, **teacher_arrays_in(reply.content))
    return {n: r for n, r in replies.items() if not r.has_error()}


def _load_signer(run: RunConfig):
    """The server's Ed25519 signing key (run setting signing-key), or None: fail before phase 1."""
    if not run.signing_key:
        return None
    from fedbrats.common.security.signing import load_private_key, public_key_fingerprint

    key = load_private_key(run.signing_key)
    log(INFO, "fedbrats: signing checkpoints, student.pt and the students sent with %s (%s)",
        run.signing_key, public_key_fingerprint(key))
    return key


def query_sites(grid: Grid, run: RunConfig, folder: RunFolder
                ) -> tuple[list[int], dict[int, str], dict[str, dict], dict[str, str]]:
    """Wait for the sites and ask each for its facts: ``(nodes, population of each node,
    {population: {"info": facts}}, {population: where its code runs from})``."""
    log(INFO, "fedbrats: waiting for %d sites", run.num_sites)
    nodes = _wait_for_sites(grid, run.num_sites)
    log(INFO, "fedbrats: querying %d sites", len(nodes))
    replies = _send(grid, nodes, wire.INFO, lambda: RecordDict({wire.CONFIG: ConfigRecord()}),
                    600.0, folder, "info")
    names = {n: str(r.content[wire.INFO_RECORD]["population"]) for n, r in replies.items()}
    sites: dict[str, dict] = {
        names[n]: {"info": {k: v for k, v in r.content[wire.METRICS].items()}}
        for n, r in replies.items()
    }
    codes = {names[n]: str(r.content[wire.INFO_RECORD].get(wire.CODE_KEY, ""))
             for n, r in replies.items()}
    for pop, s in sites.items():
        log(INFO, "  %s: %d train / %d validation cases", pop, s["info"]["num_train"],
            s["info"]["num_val"])
    if len(names) < run.num_sites:
        raise RuntimeError(f"only {len(names)} of {run.num_sites} sites answered the info query")
    return nodes, names, sites, codes


WARM_START_FILE = "warm-start.pt"


def _signed_config(arrays: ArrayRecord, signer, **values) -> ConfigRecord:
    config = ConfigRecord(values)
    if signer is not None:
        from fedbrats.common.security.signing import SIGNATURE_CONFIG_KEY, sign_arrays

        config[SIGNATURE_CONFIG_KEY] = sign_arrays(arrays, signer)
    return config


def warm_start(grid: Grid, run: RunConfig, folder: RunFolder, nodes: list[int],
               names: dict[int, str], signer) -> ArrayRecord | None:
    """Phase 1's federated warm start (``teacher-warm-rounds``; None when 0): the teacher
    network, averaged with equal weight per site after every round, kept in the run folder
    after each so that a restarted run goes on from the last round done."""
    if not run.teacher_warm_rounds:
        return None
    import torch
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedbrats.common.networks.models import new_warm_teacher
    from fedbrats.common.utils.files import save_atomic

    path = folder.path / WARM_START_FILE
    done, state = 0, new_warm_teacher(run).net.state_dict()
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        done, state = int(saved["round"]), saved["state_dict"]
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})
    if done:
        log(INFO, "fedbrats: teachers' warm start resumes after round %d of %d", done,
            run.teacher_warm_rounds)
    for rnd in range(done + 1, run.teacher_warm_rounds + 1):
        t0 = time.monotonic()
        config = _signed_config(arrays, signer, **{wire.SERVER_ROUND: rnd})
        replies = _send(grid, nodes, wire.WARM,
                        lambda a=arrays, c=config: RecordDict({wire.ARRAYS: a, wire.CONFIG: c}),
                        run.round_timeout, folder, "warm", names)
        if len(replies) < len(nodes):
            raise RuntimeError(f"teachers' warm start, round {rnd}: {len(replies)} of "
                               f"{len(nodes)} sites replied; see the log and audit.jsonl")
        mean = aggregate_arrayrecords([r.content for r in replies.values()], wire.WEIGHT_KEY)
        # Flower's mean is float64 throughout: each array back to the dtype it was sent in
        # (a batch-norm step counter stays an integer, the weights float32)
        arrays = ArrayRecord({k: torch.from_numpy(mean[k].numpy().astype(arrays[k].numpy().dtype))
                              for k in arrays.keys()})
        save_atomic(path, {"round": rnd, "state_dict": arrays.to_torch_state_dict()})
        losses = {names[n]: round(float(r.content[wire.METRICS]["loss"]), 4)
                  for n, r in replies.items()}
        log(INFO, "fedbrats: teachers' warm start, round %d/%d in %.1f s; site losses %s", rnd,
            run.teacher_warm_rounds, time.monotonic() - t0, losses)
    return arrays


def train_teachers(grid: Grid, folder: RunFolder, nodes: list[int], names: dict[int, str],
                   sites: dict[str, dict], warm: ArrayRecord | None = None,
                   signer=None) -> None:
    """Phase 1: every site trains (or reuses) its teacher, in parallel, from the warm-start
    network ``warm`` when there is one; metrics come back."""
    log(INFO, "fedbrats: phase 1, training the teachers at the sites")

    def content() -> RecordDict:
        if warm is None:
            return RecordDict({wire.CONFIG: ConfigRecord()})
        return RecordDict({wire.ARRAYS: warm, wire.CONFIG: _signed_config(warm, signer)})

    replies = _send(grid, nodes, wire.TEACHER, content, LONG_TIMEOUT_S, folder, "teacher",
                    names)
    for n, r in replies.items():
        m = dict(r.content[wire.METRICS])
        sites[names[n]]["teacher_training"] = m
        log(INFO, "  %s teacher: WT Dice %.3f%s", names[n], m.get("WT_dice", float("nan")),
            " (reused)" if m.get("reused") else "")
    if len(replies) < len(nodes):
        raise RuntimeError("phase 1 failed at some sites; see the log and audit.jsonl")
    folder.write_json("sites.json", sites)


def _resume_point(run: RunConfig, folder: RunFolder, signer, warm: ArrayRecord | None = None):
    """``(rounds done, the rounds.json entries kept, the student to start from, checkpoint)``;
    a signed run refuses a checkpoint whose signature does not verify. Without a checkpoint
    the student starts from the warm-start network ``warm`` with ``student-init`` warm."""
    ckpt = folder.latest_checkpoint()
    done = ckpt.round if ckpt else 0
    rounds: list[dict] = [r for r in folder.read_json("rounds.json", []) if r["round"] <= done]
    if ckpt:
        arrays = ckpt.state_dict
    elif run.student_init == "warm" and warm is not None:
        arrays = warm.to_torch_state_dict()
        if run.student_heads == "population":  # every head starts as the warm start's block
            arrays = expand_to_heads(arrays, initial_student_arrays(run))
    else:
        arrays = initial_student_arrays(run)
    if done:
        check_resumable(folder, done, arrays, initial_student_arrays(run))
        log(INFO, "fedbrats: resuming after round %d of %d", done, run.num_rounds)
        if signer is not None:
            from fedbrats.common.security.signing import SignatureError, sig_path, verify_file

            path = folder.path / "checkpoints" / f"round-{done:03d}.pt"
            if sig_path(path).exists():
                try:
                    verify_file(path, signer.public_key())
                except SignatureError as e:  # refuse to resume from it
                    raise SignatureError(
                        f"{e}. The run does not resume from a checkpoint it cannot trust; to "
                        f"resume after round {done - 1} instead, move {path.name} and "
                        f"{sig_path(path).name} out of {path.parent}") from None
            else:
                log(WARNING, "fedbrats: %s has no signature (written before signing-key was "
                    "set); resuming from it anyway", path)
    return done, rounds, arrays, ckpt


def distil(grid: Grid, context: Context, run: RunConfig, folder: RunFolder,
           names: dict[int, str], signer, warm: ArrayRecord | None = None,
           baseline: bool = False) -> ArrayRecord:
    """Phase 2: the distillation rounds not yet done, with the run's Flower strategy (or
    SecAgg+); the global student is checkpointed after every round. Returns the final student.
    With ``baseline`` the same rounds train the labels-only FedAvg baseline instead."""
    done, rounds, arrays, ckpt = _resume_point(run, folder, signer, warm)
    final_arrays = ArrayRecord(arrays)
    if done < run.num_rounds and run.secure_aggregation:
        from fedbrats.server.secagg import secagg_rounds

        log(INFO, "fedbrats: phase 2, %d distillation rounds aggregated with SecAgg+ (the "
            "server sees only the mean update)", run.num_rounds - done)
        final_arrays = secagg_rounds(grid, context, run, folder, names, rounds, final_arrays,
                                     done, signer)
    elif done < run.num_rounds:
        strategy = build_strategy(run, folder, names, rounds, round_offset=done,
                                  strategy_state=ckpt.strategy_state if ckpt else None)
        log(INFO, "fedbrats: phase 2, %d distillation rounds (%s, %s weights; a round counts "
            "with >= %d of %d sites, waiting up to %.0f s for them)", run.num_rounds - done,
            run.strategy, run.aggregation, run.required_sites, run.num_sites, run.round_timeout)
        result = strategy.start(
            grid=grid, initial_arrays=final_arrays, num_rounds=run.num_rounds - done,
            timeout=run.round_timeout,
            train_config=ConfigRecord({wire.ROUND_OFFSET: done,
                                       **({wire.BASELINE: True} if baseline else {})}),
            evaluate_config=ConfigRecord({wire.ROUND_OFFSET: done,
                                          **({wire.BASELINE: True} if baseline else {})}),
        )
        final_arrays = result.arrays
    return final_arrays


BASELINE_FOLDER = "baseline"


def train_baseline(grid: Grid, context: Context, run: RunConfig, folder: RunFolder,
                   names: dict[int, str], signer) -> ArrayRecord | None:
    """``baseline = "fedavg"``: the labels-only FedAvg model, the student's rounds again with
    the same strategy and schedule, in ``output-dir/baseline`` (its own checkpoints and
    rounds.json, so that it resumes like the student); None when off."""
    if run.baseline != "fedavg":
        return None
    brun = dataclasses.replace(run.baseline_run(), output_dir=str(folder.path / BASELINE_FOLDER),
                               keep_site_updates=False)
    log(INFO, "fedbrats: the labels-only FedAvg baseline, %d rounds", run.num_rounds)
    return distil(grid, context, brun, RunFolder(brun), names, signer, baseline=True)


def evaluate_final(grid: Grid, run: RunConfig, folder: RunFolder, nodes: list[int],
                   names: dict[int, str], sites: dict[str, dict], final_arrays: ArrayRecord,
                   signer, baseline: ArrayRecord | None = None) -> None:
    """Save (and sign) the final student; each site scores it beside its teacher."""
    student_path = folder.save_student(final_arrays.to_torch_state_dict(), run.num_rounds)
    log(INFO, "fedbrats: final student saved to %s", student_path)
    final_config = ConfigRecord()
    if signer is not None:
        from fedbrats.common.security.signing import SIGNATURE_CONFIG_KEY, sign_arrays, sign_file

        log(INFO, "fedbrats: signature written to %s", sign_file(student_path, signer))
        final_config[SIGNATURE_CONFIG_KEY] = sign_arrays(final_arrays, signer)
    points = None
    if run.postprocess_tuning != "off":
        from fedbrats.common.inference.postprocess_tuning import encode_grid, grid_points

        points = grid_points()
        final_config[wire.POSTPROCESS_GRID] = encode_grid(points)
        log(INFO, "fedbrats: each site also scores %d post-processing settings", len(points))
    log(INFO, "fedbrats: final evaluation of the student beside each site's teacher")
    records = {wire.ARRAYS: final_arrays, wire.CONFIG: final_config}
    if baseline is not None:
        records[wire.BASELINE] = baseline
    replies = _send(grid, nodes, wire.FINAL, lambda: RecordDict(records),
                    LONG_TIMEOUT_S, folder, "final", names)
    for n, r in replies.items():
        sites[names[n]].update(parse_scores(r.content[wire.METRICS]))
        if "personal_steps" in r.content[wire.METRICS]:
            sites[names[n]]["personal_steps"] = int(r.content[wire.METRICS]["personal_steps"])
    if points is not None:
        tune_postprocessing(run, folder, sites, points, final_arrays, signer)
    folder.write_json("sites.json", sites)


def tune_postprocessing(run: RunConfig, folder: RunFolder, sites: dict[str, dict], points: list,
                        final_arrays: ArrayRecord, signer) -> None:
    """Keep the post-processing thresholds the sites' grid scores favour
    (:func:`~fedbrats.common.inference.postprocess_tuning.choose`), write them into student.pt
    (signed again) and ``postprocess.json``, and each site's gain into ``sites.json``."""
    import numpy as np

    from fedbrats.common.data.contract import REGIONS
    from fedbrats.common.inference.postprocess_tuning import choose

    scores = {}
    for pop, entry in sites.items():
        grid = entry.pop(wire.POSTPROCESS_SCORES, None) or {}
        table = np.full((len(points), len(REGIONS)), np.nan)
        for i, regions in grid.items():
            for j, region in enumerate(REGIONS):
                table[int(i), j] = regions.get(region, np.nan)
        if grid:
            scores[pop] = table
    if not scores:
        log(WARNING, "fedbrats: no site returned post-processing scores; student.pt keeps the "
            "default thresholds")
        return
    choice = choose(scores, points, run.postprocess_tuning)
    path = folder.save_student(final_arrays.to_torch_state_dict(), run.num_rounds,
                               postprocess=choice.chosen,
                               postprocess_by_population=choice.by_population or None)
    if signer is not None:
        from fedbrats.common.security.signing import sign_file

        sign_file(path, signer)
    folder.write_json("postprocess.json", choice.to_dict())
    for pop, figures in choice.site_scores.items():
        sites[pop]["postprocess"] = {**figures, "thresholds": choice.by_population.get(
            pop, choice.chosen).to_dict()}
    shown = ", ".join(f"{p} {v['gain']:+.3f}" for p, v in choice.site_scores.items())
    log(INFO, "fedbrats: post-processing tuned (%s): %s; written into %s; mean lesion-wise Dice "
        "on the validation cases, gain over the defaults: %s", run.postprocess_tuning,
        choice.chosen.to_dict() if not choice.by_population else
        {p: t.to_dict() for p, t in choice.by_population.items()}, path, shown)


def report(run: RunConfig, folder: RunFolder, sites: dict[str, dict], started: str,
           phase_seconds: dict[str, float], code: dict) -> None:
    """``report.json``, ``report.md`` and the charts in the run folder."""
    from fedbrats.server.privacy import privacy_summary
    from fedbrats.server.report import summary_table, write_report

    rounds = folder.read_json("rounds.json", [])
    paths = write_report(
        folder.path,
        {"config": run.to_dict(), "started": started,
         "finished": datetime.now(UTC).isoformat(timespec="seconds"),
         "phase_seconds": phase_seconds, "code": code,
         "privacy": privacy_summary(run, rounds)},
        sites, rounds,
    )
    log(INFO, "fedbrats: report written to %s", paths["markdown"])
    # `fedbrats simulate` prints the table itself once the run is over; at INFO it came twice
    log(DEBUG, "\n%s", summary_table(str(paths["json"])))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The protocol: site facts, phase 1 (teachers), phase 2 (distillation), final evaluation."""
    run: RunConfig = load_run_config(context.run_config)
    folder = RunFolder(run)
    folder.check_and_write_config()
    signer = _load_signer(run)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    phase_seconds: dict[str, float] = folder.read_json("phases.json", {})

    def progress(phase: str) -> None:
        state = folder.read_json("progress.json", {})
        phases = state.get("phases", [])
        if not phases or phases[-1][0] != phase:
            phases.append([phase, time.time()])
        folder.write_json("progress.json", {"phase": phase, "since": phases[-1][1],
                                            "rounds": run.num_rounds, "phases": phases})

    def timed(phase: str, fn, *args, accumulate: bool = True):
        t0 = time.monotonic()
        # what `fedbrats simulate`'s progress display reads (with rounds.json)
        progress(phase)
        out = fn(*args)
        before = phase_seconds.get(phase, 0.0) if accumulate else 0.0
        phase_seconds[phase] = before + time.monotonic() - t0
        folder.write_json("phases.json", phase_seconds)
        return out

    nodes, names, sites, codes = query_sites(grid, run, folder)
    warm = timed("teachers", warm_start, grid, run, folder, nodes, names, signer)
    timed("teachers", train_teachers, grid, folder, nodes, names, sites, warm, signer)
    final_arrays = timed("distillation", distil, grid, context, run, folder, names, signer,
                         warm)
    baseline = timed("baseline", train_baseline, grid, context, run, folder, names, signer)
    timed("evaluation", evaluate_final, grid, run, folder, nodes, names, sites, final_arrays,
          signer, baseline, accumulate=False)
    report(run, folder, sites, started, phase_seconds,
           {"server": code_location(), "sites": codes})
    progress("done")


__all__ = ["app", "distil", "evaluate_final", "query_sites", "report", "train_baseline",
           "train_teachers", "warm_start"]
