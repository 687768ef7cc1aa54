def transpose(
    dst: int,
    src: int,
    rows: int,
    cols: int,
    dst_row_stride: int,
    src_col_stride: int,
    itemsize: int,
) -> None: ...
