"""The fedbrats ServerApp: waits for the sites, then runs the protocol.

1. ``query.info`` to every site: population, case counts, data checks.
2. Phase 1, ``train.teacher``: every site trains its teacher, in parallel; metrics come back.
3. Phase 2, distillation rounds with a Flower strategy (FedAvg by default; FedProx, FedAdam);
   replies are weighted equally per population (or by training cases). The global student is
   saved after every round; a restarted run goes on from the last saved round.
4. ``evaluate.final``: the final student beside each site's teacher; the report is written.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from logging import DEBUG, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from client.app import WEIGHT_KEY
from common.config import RunConfig, load_run_config
from server.protocol import (
    build_strategy,
    check_resumable,
    initial_student_arrays,
    parse_scores,
    teacher_arrays_in,
)
from server.state import RunFolder

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
    from common.signing import load_private_key, public_key_fingerprint

    key = load_private_key(run.signing_key)
    log(INFO, "fedbrats: signing checkpoints, student.pt and the students sent with %s (%s)",
        run.signing_key, public_key_fingerprint(key))
    return key


@app.main()
def main(grid: Grid, context: Context) -> None:
    run: RunConfig = load_run_config(context.run_config)
    folder = RunFolder(run)
    folder.check_and_write_config()
    signer = _load_signer(run)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    phase_seconds: dict[str, float] = folder.read_json("phases.json", {})

    log(INFO, "fedbrats: waiting for %d sites", run.num_sites)
    nodes = _wait_for_sites(grid, run.num_sites)

    # -- site facts ---------------------------------------------------------------------------
    log(INFO, "fedbrats: querying %d sites", len(nodes))
    replies = _send(grid, nodes, "query.info", lambda: RecordDict({"config": ConfigRecord()}),
                    600.0, folder, "info")
    names = {n: str(r.content["info"]["population"]) for n, r in replies.items()}
    sites: dict[str, dict] = {
        names[n]: {"info": {k: v for k, v in r.content["metrics"].items()}}
        for n, r in replies.items()
    }
    for pop, s in sites.items():
        log(INFO, "  %s: %d train / %d validation cases", pop, s["info"]["num_train"],
            s["info"]["num_val"])
    if len(names) < run.num_sites:
        raise RuntimeError(f"only {len(names)} of {run.num_sites} sites answered the info query")

    # -- phase 1: teachers ------------------------------------------------------------------
    t0 = time.monotonic()
    log(INFO, "fedbrats: phase 1, training the teachers at the sites")
    replies = _send(grid, nodes, "train.teacher", lambda: RecordDict({"config": ConfigRecord()}),
                    LONG_TIMEOUT_S, folder, "teacher", names)
    for n, r in replies.items():
        m = dict(r.content["metrics"])
        sites[names[n]]["teacher_training"] = m
        log(INFO, "  %s teacher: WT Dice %.3f%s", names[n], m.get("WT_dice", float("nan")),
            " (reused)" if m.get("reused") else "")
    if len(replies) < len(nodes):
        raise RuntimeError("phase 1 failed at some sites; see the log and audit.jsonl")
    phase_seconds["teachers"] = phase_seconds.get("teachers", 0.0) + time.monotonic() - t0
    folder.write_json("sites.json", sites)

    # -- phase 2: distillation rounds ---------------------------------------------------------
    t0 = time.monotonic()
    ckpt = folder.latest_checkpoint()
    done = ckpt.round if ckpt else 0
    rounds: list[dict] = [r for r in folder.read_json("rounds.json", []) if r["round"] <= done]
    arrays = ckpt.state_dict if ckpt else initial_student_arrays(run)
    if done:
        check_resumable(folder, done, arrays, initial_student_arrays(run))
        log(INFO, "fedbrats: resuming after round %d of %d", done, run.num_rounds)
        if signer is not None:
            from common.signing import sig_path, verify_file

            path = folder.path / "checkpoints" / f"round-{done:03d}.pt"
            if sig_path(path).exists():
                verify_file(path, signer.public_key())  # SignatureError: refuse to resume
            else:
                log(WARNING, "fedbrats: %s has no signature (written before signing-key was "
                    "set); resuming from it anyway", path)
    final_arrays = ArrayRecord(arrays)
    if done < run.num_rounds and run.secure_aggregation:
        from server.secagg import secagg_rounds

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
            train_config=ConfigRecord({"round-offset": done}),
            evaluate_config=ConfigRecord({"round-offset": done}),
        )
        final_arrays = result.arrays
    phase_seconds["distillation"] = phase_seconds.get("distillation", 0.0) + time.monotonic() - t0
    folder.write_json("phases.json", phase_seconds)
    student_path = folder.save_student(final_arrays.to_torch_state_dict(), run.num_rounds)
    log(INFO, "fedbrats: final student saved to %s", student_path)
    final_config = ConfigRecord()
    if signer is not None:
        from common.signing import SIGNATURE_CONFIG_KEY, sign_arrays, sign_file

        log(INFO, "fedbrats: signature written to %s", sign_file(student_path, signer))
        final_config[SIGNATURE_CONFIG_KEY] = sign_arrays(final_arrays, signer)

    # -- final evaluation ---------------------------------------------------------------------
    t0 = time.monotonic()
    log(INFO, "fedbrats: final evaluation of the student beside each site's teacher")
    replies = _send(grid, nodes, "evaluate.final",
                    lambda: RecordDict({"arrays": final_arrays, "config": final_config}),
                    LONG_TIMEOUT_S, folder, "final", names)
    for n, r in replies.items():
        sites[names[n]].update(parse_scores(r.content["metrics"]))
    phase_seconds["evaluation"] = time.monotonic() - t0
    folder.write_json("phases.json", phase_seconds)
    folder.write_json("sites.json", sites)

    from server.privacy import privacy_summary
    from server.report import summary_table, write_report

    paths = write_report(
        folder.path,
        {"config": run.to_dict(), "started": started,
         "finished": datetime.now(UTC).isoformat(timespec="seconds"),
         "phase_seconds": phase_seconds,
         "privacy": privacy_summary(run, folder.read_json("rounds.json", []))},
        sites,
        folder.read_json("rounds.json", []),
    )
    log(INFO, "fedbrats: report written to %s", paths["markdown"])
    # `fedbrats simulate` prints the table itself once the run is over; at INFO it came twice
    log(DEBUG, "\n%s", summary_table(str(paths["json"])))


__all__ = ["app", "WEIGHT_KEY"]
