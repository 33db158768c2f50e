"""The built images against the chart: every command the Helm chart runs (containers,
init containers, exec probes, lifecycle hooks, for each value set test_deploy
renders) is in the filesystem of the image the chart runs it from, and the chart's
image names and tags are the ones the build produces.

The images are built with podman (tools/images/build.py, on the local Debian base,
with the host's llama.cpp and torch wheels); the commands are looked up in the
built images' filesystems, on each image's own PATH, not in the Dockerfiles' text.
On the 2-core machine it was written on, building the base and both images from an
empty layer cache took about two and a half minutes (with the wheel cache's llama.cpp;
compiling it adds three minutes or more), and the test ran in 45 s once `python -m
tools.images check` had built the same sources. That is too long beside the suite's
other work in CI, so it is slow, and runs only with CHORUS_IMAGE_TESTS=1 where podman
is installed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("CHORUS_IMAGE_TESTS") != "1" or shutil.which("podman") is None,
                       reason="builds the images with podman: set CHORUS_IMAGE_TESTS=1 where podman is installed"),
]

import test_deploy  # noqa: E402  (the renderer and value sets of the chart's own tests)

from tools.images import base, build, chart  # noqa: E402
from tools.images.podman import env, image_exists, mounted  # noqa: E402

WORK = Path(os.environ.get("CHORUS_IMAGES_WORK", Path.home() / ".cache/chorus/images"))


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    """Chart image name (chorus-tts:0.1.0) -> the built image's local ref."""
    base.make()
    refs = {}
    for name, image in build.images().items():
        if not image.buildable:
            continue
        wheels = build.prepare_wheels(WORK, image.dockerfile) if name == "cpu" else None
        result = build.build(image, base.REF, WORK, wheels)
        assert result["ok"], result.get("error")
        assert image_exists(image.ref)
        refs[image.ref.removeprefix("localhost/")] = image.ref
    return refs


def _objects(values) -> list[dict]:
    return test_deploy._docs(test_deploy._render(values).values())


def test_chart_names_the_images_the_build_produces(built):
    named = {c[1].removeprefix("localhost/") for values in test_deploy.VARIANTS.values()
             for c in chart.commands(_objects(values))}
    produced = {f"{image.repository}:{build.VERSION}" for image in build.images().values()}
    chorus = {image for image in named if image.split(":")[0].startswith("chorus")}
    # Every Chorus image the chart runs is one the Dockerfiles produce, under that exact name and tag...
    assert chorus <= produced, chorus - produced
    # ...and every one built here is run by the chart (the CUDA image only with gpu.enabled).
    assert set(built) <= chorus
    assert chorus - set(built) == {f"{build.images()['cuda'].repository}:{build.VERSION}"}


@pytest.mark.parametrize("variant", test_deploy.VARIANTS)
def test_every_chart_command_is_in_its_image(built, variant):
    checked, missing = 0, []
    for where, image, command in chart.commands(_objects(test_deploy.VARIANTS[variant])):
        ref = built.get(image.removeprefix("localhost/"))
        if ref is None:
            continue  # the CUDA image (not built here) or a third party's (Jaeger)
        with mounted(ref) as root:
            why = chart.missing_in(root, env(ref), command)
        checked += 1
        if why:
            missing.append(f"{where} ({image}): {why}")
    # With gpu.enabled only the gateway runs from an image built here.
    assert checked >= (2 if variant == "gpu" else 5), f"only {checked} commands were checked"
    assert not missing, "\n".join(missing)


def test_a_missing_command_or_module_is_found_missing(built):
    """The lookup has teeth: a name the image lacks, a module it lacks, and torch in
    the gateway image are reported, in the same filesystems."""
    gateway = built[f"{build.images()['gateway'].repository}:{build.VERSION}"]
    with mounted(gateway) as root:
        image_env = env(gateway)
        assert chart.missing_in(root, image_env, ["chorus-gateway"]) is None
        assert chart.missing_in(root, image_env, ["sleep", "5"]) is None
        assert "not on the image's PATH" in chart.missing_in(root, image_env, ["chorus-no-such-command"])
        assert "not in the image's site-packages" in chart.missing_in(root, image_env, ["python", "-m", "torch"])
        assert chart.missing_in(root, image_env, ["python", "-m", "chorus.rpc.probe"]) is None
