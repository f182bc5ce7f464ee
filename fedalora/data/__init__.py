"""Task data: packaged offline corpora or local files, partitioned with flwr-datasets,
split per client into train and held-out test, tokenised once per worker.

Two kinds of data set, told apart by their columns:
- classification: ``text`` and ``label`` (a sequence classifier with a local head);
- instruction: ``instruction`` and ``response`` (and ``task`` for one task per client):
  a causal LM trained on the response tokens only (the prompt is masked out of the
  loss) and scored by generating the response.

``sources`` reads a data set, ``columns`` names its columns and labels,
``partitioning`` splits it into clients, ``tokenising`` makes one client's train and
test examples, ``collating`` pads them into batches; ``settings`` is the configuration
section that chooses all of it.
"""

from .collating import IGNORE, collate, pad_right
from .columns import DEFAULT_COLUMNS, ColumnNames, is_instruction_data, label_names
from .settings import DataSettings
from .sources import LOCAL_FORMS, PACKAGED_DATASETS, load_labelled_dataset, num_labels_of
from .tokenising import ANSWER, ClientData, load_client_data, load_official_test

__all__ = [
    "ANSWER",
    "DEFAULT_COLUMNS",
    "IGNORE",
    "LOCAL_FORMS",
    "PACKAGED_DATASETS",
    "ClientData",
    "ColumnNames",
    "DataSettings",
    "collate",
    "is_instruction_data",
    "label_names",
    "load_client_data",
    "load_labelled_dataset",
    "load_official_test",
    "num_labels_of",
    "pad_right",
]
