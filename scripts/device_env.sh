# Sourced by the scripts that run on a lent GPU machine (no network): installs the wheels
# that scripts/device_wheels.sh put in .whl/ into /tmp/site, once per machine (scripts
# that run side by side share it), and puts it and the repository on PYTHONPATH.
if ls .whl/*.whl > /dev/null 2>&1 && [ ! -f /tmp/site/.m4-wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && touch /tmp/site/.m4-wheels || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
