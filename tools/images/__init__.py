"""The container images, built, run and scanned on this machine with podman.

`python -m tools.images check` does all of it in one go (docs/deploy.md, "Check the
images here"); each step is its own module:

- base.py: the local Debian base (mmdebstrap), for machines that reach Debian's
  archive but not Docker Hub
- build.py: the images from deploy/docker/, with the host's prebuilt wheels
- podman.py: podman as these steps drive it, `podman run` where crun may not
  set rlimits, and an image's filesystem
- run.py: the images' entry points serving one synthesis end to end
- chart.py: every command the Helm chart runs, looked up in its built image
- sizes.py: sizes and what takes the space
- scan.py: checkov on the Dockerfiles and the rendered chart, an SBOM and a
  pip-audit per image
- check.py: all of the above in order, with a summary and a JSON record
"""
