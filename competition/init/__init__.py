"""``competition init DATA_DIR``: look at a data folder, write a commented competition config and a
starter experiment.

It recognises the layouts the adapters read (one detector per entry of ``competition.config.FORMATS``),
reads the classes from the train CSV, the JSON labels or the masks (names from a small CSV mapping
values to names, such as ``classes.csv`` with ``ClassId,name``, or a ``classes.txt`` with one name per
line), finds the image and test folders, a groups CSV or column (or group sub-folders), the sample
submission, image sizes and channels, and the RLE pixel order (non-square images: the order with the
compact masks; square ones: the order whose mask boundaries lie on the image's edges). It then loads
the data through the real adapter with the draft config (labels, groups, the sample submission, the
masks' fit to their images), so what it writes is what ``make folds`` will read; what it could not
decide is printed, and every key it writes carries a comment saying what it means and how it was
chosen. A CSV it cannot read (not UTF-8, not a CSV) is named with the reason, never skipped silently.

    scan.py      the folder's files and the CSV readings decisions are made from
    layouts.py   the three layouts the adapters read, recognised from those files
    decide.py    classes, void, groups, images, pixel order, submission, task; the starter experiment
    render.py    what every key means, the draft being written and its commented YAML
    command.py   the command: draft, check through the real adapter, write
"""
from competition.init.command import InitResult, check, draft, init
from competition.init.decide import starter_experiment

__all__ = ["InitResult", "check", "draft", "init", "starter_experiment"]
