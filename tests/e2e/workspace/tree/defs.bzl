"""A rule producing a tree artifact (ctx.actions.declare_directory) and a rule consuming one."""

def _tree_impl(ctx):
    out = ctx.actions.declare_directory(ctx.label.name)
    ctx.actions.run_shell(
        outputs = [out],
        arguments = [out.path],
        command = " && ".join([
            "mkdir -p $1/nested/deeper $1/bin",
            "echo one > $1/one.txt",
            "echo two > $1/nested/two.txt",
            "echo three > $1/nested/deeper/three.txt",
            ": > $1/empty.txt",
            "printf '#!/bin/sh\\necho tree-tool-ran\\n' > $1/bin/tool.sh",
            "chmod 755 $1/bin/tool.sh",
        ]),
        mnemonic = "MakeTree",
        progress_message = "Making tree artifact %s" % out.short_path,
    )
    return [DefaultInfo(files = depset([out]), runfiles = ctx.runfiles(files = [out]))]

tree_artifact = rule(
    implementation = _tree_impl,
)

def _expand_impl(ctx):
    out = ctx.actions.declare_file(ctx.label.name + ".txt")
    tree = ctx.file.tree
    args = ctx.actions.args()
    args.add(out)

    # A tree artifact passed to add_all expands to the files inside it.
    args.add_all([tree])
    ctx.actions.run_shell(
        outputs = [out],
        inputs = [tree],
        arguments = [args],
        command = "out=$1; shift; for f in \"$@\"; do echo \"${f##*/tree/}: $(head -n 1 $f)\"; done | LC_ALL=C sort > $out",
        mnemonic = "ExpandTree",
    )
    return [DefaultInfo(files = depset([out]), runfiles = ctx.runfiles(files = [out]))]

expanded_tree = rule(
    implementation = _expand_impl,
    attrs = {"tree": attr.label(mandatory = True, allow_single_file = True)},
)
