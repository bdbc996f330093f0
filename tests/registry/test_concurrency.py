"""Processes registering at once, on each backend: every one succeeds, with distinct version numbers."""

import time

SUBPROCESS_TIMEOUT_S = 120  # each child imports modelpress (about 1 s) and registers a few small files
CHILDREN = 2  # the race needs two; each child costs about a second of CPU on a shared machine


def run_together(spawn, folders, name, go, envs):
    children = [spawn(folder, name, go=go, env=env) for folder, env in zip(folders, envs, strict=True)]
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while len(list(go.parent.glob(f"{go.name}.ready.*"))) < len(children) and time.monotonic() < deadline:
        assert all(c.poll() is None for c in children), [c.communicate() for c in children if c.poll() is not None]
        time.sleep(0.01)
    go.touch()  # every child has imported modelpress and now races to open the registry and register
    results = []
    for child in children:
        out, err = child.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        assert child.returncode == 0, err
        results.append(int(out.strip().splitlines()[-1]))
    return results


def test_concurrent_registrations_get_distinct_versions(registry, make_artifact, spawn, tmp_path):
    registry.register(make_artifact("seed"), "m")
    folders = [make_artifact(f"c{i}").path for i in range(CHILDREN)]
    got = run_together(spawn, folders, "m", tmp_path / "go", [{}] * CHILDREN)
    assert sorted(got) == list(range(2, 2 + CHILDREN))
    versions = registry.list_versions("m")
    assert [v.version for v in versions] == list(range(1, 2 + CHILDREN))
    assert len({v.content_hash for v in versions}) == len(versions) and registry.check().ok


def test_concurrent_registrations_through_separate_stores(backend, make_artifact, spawn, tmp_path):
    """As machines sharing one database would: no common file lock, only the database's guarantees.
    Nothing exists yet, so the children also race to create the schema and the model's row."""
    from modelpress.registry.api import Registry

    folders = [make_artifact(f"s{i}").path for i in range(CHILDREN)]
    folders.append(make_artifact("s0").path)  # the same files as the first: both insert the artifact row
    envs = [{"MODELPRESS_REGISTRY_STORE": str(tmp_path / f"store-{i}")} for i in range(len(folders))]
    got = run_together(spawn, folders, "fresh", tmp_path / "go", envs)
    assert sorted(got) == list(range(1, len(folders) + 1))
    with Registry(store=tmp_path / "store-0") as reg:
        assert [m["versions"] for m in reg.list_models()] == [len(folders)]
        assert {(tmp_path / f"store-{i}" / "registry-id").read_text().strip() for i in range(len(folders))} == {reg.registry_id}
