"""dtype names across the recipe and safetensors. Plain tables: importing this loads no torch."""

from __future__ import annotations

RECIPE_TO_CODE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CODE_TO_RECIPE = {code: name for name, code in RECIPE_TO_CODE.items()}
# Integer and boolean tensors (position ids, masks, index buffers) are never merged: they are
# copied from the base when every source holds the same values.
INTEGER_ITEM_SIZES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
                      "U8": 1, "BOOL": 1}
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, **INTEGER_ITEM_SIZES}


def is_integer_code(code: str) -> bool:
    return code in INTEGER_ITEM_SIZES
