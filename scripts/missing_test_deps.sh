#!/usr/bin/env bash
# Prints, one per line, the Debian packages the tests need whose commands are not on PATH; nothing when all are
# present. Each dependency is checked on its own, so a machine that already has SLURM still gets Chromium.
# Used by install.sh --with-test-deps; tests/unit/test_install.py runs it with stand-in commands on PATH.
#   command(s) the tests run      package
deps=(
    "slurmctld                     slurmctld"
    "slurmd                        slurmd"
    "sbatch                        slurm-client"
    "munged                        munge"
    "chromium|chromium-browser     chromium"
)
for dep in "${deps[@]}"; do
    read -r commands package <<<"$dep"
    found=
    IFS='|' read -ra names <<<"$commands"
    for name in "${names[@]}"; do
        command -v "$name" >/dev/null 2>&1 && found=1
    done
    [ -n "$found" ] || echo "$package"
done
