"""README.md's "As a library" script runs as written: a fresh interpreter, the fake upstream at $UPSTREAM_URL
(in this process, so the test can see what reached it), and the script's printed output checked line by line."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from fusillade.mock_upstream import Behaviour, MockUpstream, reply_text

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## As a library"


def library_example() -> str:
    """The first Python block of the README's library section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, f"no Python block under {SECTION!r}"
    return found.group(1)


def test_the_example_is_a_whole_script_through_the_service() -> None:
    code = library_example()
    assert "asyncio.run(main())" in code
    for step in ("fusillade.Service(", "upload_file(", "create_batch(", "daemon.run()", "open_file_content("):
        assert step in code
    for closing in (
        "daemon.stop()",
        "await running",
        "await storage.close()",
        "async with fusillade.UpstreamClient",
    ):
        assert closing in code


async def test_the_library_example_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(library_example(), encoding="utf-8")
    async with MockUpstream(Behaviour()) as upstream:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-W",
            "always::ResourceWarning",  # an unclosed connection or file would be reported on stderr
            str(script),
            cwd=tmp_path,
            env={**os.environ, "UPSTREAM_URL": upstream.url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=45)
        seen = upstream.stats.requests_total
    assert (process.returncode, stderr.decode()) == (0, "")
    lines = stdout.decode().splitlines()
    assert re.fullmatch(r"\S+: completed, 2 of 2 completed", lines[0])
    assert sorted(lines[1:]) == [f"request-{number}: {reply_text(f'Say {number}')}" for number in (1, 2)]
    assert seen == 2
    assert (tmp_path / "library-example.db").exists()
