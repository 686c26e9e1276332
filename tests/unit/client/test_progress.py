import io

from esm2_service.client.progress import Progress


def test_progress_writes_counts_in_place_only_when_enabled():
    stream = io.StringIO()
    with Progress(5, "seq", enabled=True, stream=stream) as progress:
        progress.update(2)
        progress.update(3)
    text = stream.getvalue()
    assert text.startswith("\r0/5 seq") and "\r2/5 seq" in text and "\r5/5 seq" in text
    assert text.endswith("\n")
    silent = io.StringIO()  # not a terminal, so auto means off
    with Progress(5, stream=silent) as progress:
        progress.update(5)
    assert silent.getvalue() == ""
