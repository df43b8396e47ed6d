"""The named configs: ``python -m experiments.train --config <name>`` loads ``<name>.py`` here
(``attnjax-train --config <name>`` from an installed wheel). Each file defines ``config()``."""
