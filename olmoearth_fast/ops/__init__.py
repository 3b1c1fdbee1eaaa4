"""One public function per op, in the module of the same name; each picks Triton / C++ /
reference by device: `ops.packing` (pack, unpack, merge indexing), `ops.patch_embed`,
`ops.masked_neg_loss`. (Functions are not re-exported here: `patch_embed` and
`masked_neg_loss` would shadow their modules.)
"""
