#!/usr/bin/env python3
"""End-to-end tests of mvm-agent run natively over a unix socket (docs/protocol.md).

usage: test_agent.py [--prior "N passed, 0 failed"] DEV_AGENT NODEV_AGENT
Prints one line per failure and a final line "N passed, M failed" (N includes --prior's count).
"""
import os
import shutil
import sys
import tempfile
import traceback

import agent_exec_cases  # noqa: F401 (registers its cases, first)
import agent_stream_cases  # noqa: F401
from agent_harness import TESTS, Agent


def main():
    args = sys.argv[1:]
    prior = 0
    if args and args[0] == "--prior":
        words = args[1].replace(",", " ").split()
        if len(words) >= 4 and words[1] == "passed" and words[3] == "failed":
            prior = int(words[0])
            if int(words[2]) != 0:
                print("prior tests failed")
                sys.exit(1)
        args = args[2:]
    dev, nodev = args
    tempfile.tempdir = tempfile.mkdtemp(prefix="mvm-agent-tests-")
    a, n = Agent(dev), Agent(nodev)
    a.binary, n.binary = dev, nodev
    passed = failed = skipped = 0
    # ONLY=name runs just the matching tests while debugging; the rest are counted and said skipped.
    only = os.environ.get("ONLY")
    for t in TESTS:
        if only and only not in t.__name__:
            skipped += 1
            continue
        try:
            t(a, n)
            passed += 1
        except Exception:
            failed += 1
            print("FAIL %s" % t.__name__)
            traceback.print_exc()
        for ag in (a, n):
            if ag.proc.poll() is not None:
                print("FAIL agent died (%s) after %s" % (ag.proc.returncode, t.__name__))
                failed += 1
                return finish(prior, passed, failed, skipped, a, n)
    return finish(prior, passed, failed, skipped, a, n)


def finish(prior, passed, failed, skipped, a, n):
    for ag in (a, n):
        ag.stop()
        if failed:
            with open(os.path.join(ag.dir, "stderr"), "rb") as f:
                sys.stdout.write("--- %s stderr:\n%s" % (ag.binary, f.read().decode(errors="replace")[-4000:]))
    shutil.rmtree(tempfile.tempdir, ignore_errors=True)
    note = ", %d skipped (ONLY=%s)" % (skipped, os.environ.get("ONLY")) if skipped else ""
    print("agent end-to-end: %d passed, %d failed%s" % (passed, failed, note))
    print("%d passed, %d failed%s" % (prior + passed, failed, ", %d skipped" % skipped if skipped else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
