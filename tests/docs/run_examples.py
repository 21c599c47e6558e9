#!/usr/bin/env python3
"""Run the shell examples of the docs against real wsgate nodes, so that
examples cannot drift from the binary again (issue 17).

A block is runnable when its info string is `sh run` (the runner starts a
node, `wsgate serve --jwt-secret s3cret`, on the block's 127.0.0.1:8080 and
127.0.0.1:9090) or `sh run-alone` (the block starts what it needs itself).
Every `127.0.0.1:PORT` / `localhost:PORT` of a block is mapped to a free
loopback port, the same one throughout the block. `wsgate` is the binary in
$WSGATE_BIN (default target/release/wsgate), first on PATH.

Expected output: comment lines (`# ...`) right after a command, with no
blank line between, must each appear in that command's output (stdout and
stderr); `...` stands for anything. A non-zero exit of a command fails the
block. Every block runs in a fresh temporary directory, bounded in time.

Also checks that no document or source file links outside the repository
(`../shared`, build-machine absolute paths).

    python3 tests/docs/run_examples.py [FILE.md ...]
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOCS = ["README.md", "docs/protocol.md", "docs/configuration.md",
        "crates/client/README.md", "clients/js/README.md", "deploy/README.md"]
BLOCK_TIMEOUT = 60
SECRET = "s3cret"
FENCE = re.compile(r"^```(\S*)\s*(.*)$")
ADDR = re.compile(r"\b(127\.0\.0\.1|localhost):(\d{4,5})\b")


def blocks(path):
    """(line number, mode, lines) of the runnable blocks of a markdown file."""
    out, cur = [], None
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            m = FENCE.match(line.strip())
            if cur is None and m and m.group(1) == "sh" and m.group(2) in ("run", "run-alone"):
                cur = (n, m.group(2), [])
            elif cur is not None and line.strip() == "```":
                out.append(cur)
                cur = None
            elif cur is not None:
                cur[2].append(line)
    return out


def steps(lines):
    """[(command, [expected lines])]: continuation lines (after `\\`, `|`,
    `&&`) joined."""
    result, i = [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            i += 1
            continue
        cmd = [line]
        while cmd[-1].rstrip().endswith(("\\", "|", "&&")) and i + 1 < len(lines):
            i += 1
            cmd.append(lines[i])
        i += 1
        expected = []
        while i < len(lines) and lines[i].startswith("# "):
            expected.append(lines[i][2:])
            i += 1
        result.append(("\n".join(cmd), expected))
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(ops_port, proc, deadline):
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def run_block(path, line, mode, lines, bin_dir):
    ports = {}

    def remap(text):
        def sub(m):
            port = ports.setdefault(m.group(2), str(free_port()))
            return f"{m.group(1)}:{port}"
        return ADDR.sub(sub, text)

    work = tempfile.mkdtemp(prefix="wsgate-doc-")
    # Commands name repository files relatively (clients/js/...): the work
    # directory shows them, while files a block makes stay out of the clone.
    os.symlink(os.path.join(REPO, "clients"), os.path.join(work, "clients"))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", HOME=work)
    for k in list(env):
        if k.startswith("WSGATE_"):
            del env[k]
    node = None
    where = f"{path}:{line}"
    try:
        if mode == "run":
            public, ops = remap("127.0.0.1:8080"), remap("127.0.0.1:9090")
            node = subprocess.Popen(
                ["wsgate", "serve", "--jwt-secret", SECRET, "--node-id", "node-1",
                 "--listen", public, "--ops-listen", ops],
                cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            if not wait_ready(ops.split(":")[1], node, time.time() + 20):
                return f"{where}: the node did not become ready"
        script = ["set -eo pipefail"]
        plan = steps(lines)
        for k, (cmd, _) in enumerate(plan):
            script.append(f"{{\n{remap(cmd)}\n}} > {work}/out.{k} 2>&1 </dev/null")
        proc = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            script_output = proc.communicate(timeout=BLOCK_TIMEOUT)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return f"{where}: still running after {BLOCK_TIMEOUT} s"
        finally:
            kill_group(proc)  # background servers of the block
        for k, (cmd, expected) in enumerate(plan):
            out_path = f"{work}/out.{k}"
            if not os.path.exists(out_path):
                break
            with open(out_path, encoding="utf-8", errors="replace") as f:
                output = f.read()
            last_run = k + 1 == len(plan) or not os.path.exists(f"{work}/out.{k + 1}")
            if last_run and proc.returncode != 0:
                return f"{where}: exit {proc.returncode} in\n  {cmd}\noutput:\n{output}"
            for want in expected:
                pattern = ".*".join(re.escape(remap(p)) for p in want.split("..."))
                if not re.search(pattern, output):
                    return f"{where}: expected {want!r} in the output of\n  {cmd}\noutput:\n{output}"
        if proc.returncode != 0:
            return f"{where}: exit {proc.returncode}:\n{script_output}"
        return None
    finally:
        if node is not None:
            kill_group(node)
        shutil.rmtree(work, ignore_errors=True)


def outside_links():
    """Files that link to ../shared or to an absolute path of a build machine."""
    bad = re.compile(r"\.\./shared/|/work/(shared|wt-|main)")
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    found = []
    for rel in listed.stdout.split("\n"):
        if not rel or rel.startswith("tests/docs/"):
            continue
        try:
            with open(os.path.join(REPO, rel), encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if bad.search(line):
                        found.append(f"{rel}:{n}: {line.strip()}")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
    return found


def main():
    failures = [f"links outside the repository: {x}" for x in outside_links()]
    bin_path = os.environ.get("WSGATE_BIN", os.path.join(REPO, "target", "release", "wsgate"))
    if not os.access(bin_path, os.X_OK):
        print(f"doc examples: WSGATE_BIN is not an executable: {bin_path}", file=sys.stderr)
        return 1
    bin_dir = tempfile.mkdtemp(prefix="wsgate-doc-bin-")
    os.symlink(os.path.abspath(bin_path), os.path.join(bin_dir, "wsgate"))
    total = 0
    try:
        for path in sys.argv[1:] or DOCS:
            for line, mode, lines in blocks(path):
                total += 1
                err = run_block(path, line, mode, lines, bin_dir)
                print(f"{'ok  ' if err is None else 'FAIL'} {path}:{line}")
                if err:
                    failures.append(err)
    finally:
        shutil.rmtree(bin_dir, ignore_errors=True)
    for f in failures:
        print(f"\n{f}", file=sys.stderr)
    print(f"doc examples: {total} blocks, {len(failures)} failures")
    return 1 if failures or total == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
