"""The project's own models, as opposed to the small ones some test modules register.

Test modules register tiny models under names that start with ``test-``; tests that check
every model of the project iterate over :func:`project_models` so they do not depend on the
order in which pytest imports the test modules.
"""

from cifar_inception.models import list_models

TEST_PREFIX = "test-"


def project_models() -> list[str]:
    return [name for name in list_models() if not name.startswith(TEST_PREFIX)]
