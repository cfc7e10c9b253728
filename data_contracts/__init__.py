"""Arrow data contracts for the GRAM pipeline: schemas with a name and version, validation, readers.

No torch here: this package is imported by every stage, including ones that never touch a model.
"""

from data_contracts.fingerprint import rows_sha256
from data_contracts.readers import (
    SUPPORTED_SUFFIXES,
    DatasetNotCachedError,
    load_hub_split,
    read_hub_dataset,
    read_table,
    write_table,
)
from data_contracts.schemas import (
    CONTRACTS,
    PREFERENCE_PAIRS,
    PROMPTS,
    RESPONSE_POOL,
    REWARDBENCH,
    SCORES,
    UNLABELED_PAIRS,
    Check,
    Contract,
    contract_of,
    get_contract,
)
from data_contracts.validate import (
    MAX_DROPPED_SHARE,
    ContractError,
    DroppedRow,
    TooManyInvalidRows,
    Violation,
    validate,
)

__all__ = [
    "CONTRACTS",
    "MAX_DROPPED_SHARE",
    "PREFERENCE_PAIRS",
    "PROMPTS",
    "RESPONSE_POOL",
    "REWARDBENCH",
    "SCORES",
    "SUPPORTED_SUFFIXES",
    "TooManyInvalidRows",
    "UNLABELED_PAIRS",
    "Check",
    "Contract",
    "ContractError",
    "DatasetNotCachedError",
    "DroppedRow",
    "Violation",
    "contract_of",
    "get_contract",
    "load_hub_split",
    "read_hub_dataset",
    "read_table",
    "rows_sha256",
    "validate",
    "write_table",
]
