"""YAML read with safe types only and bounds on size, expansion and depth (grid files, the
results folder's REGENERATING.yaml): one loader below everything that reads YAML."""
import yaml

from prunebench.errors import UserError

# Every YAML prunebench reads goes through load_yaml: a grid is a few hundred characters, so these
# bounds only stop input that would otherwise grow without limit (an alias bomb expands nine
# anchors of ten aliases into 10^9 items when a grid is copied), recurse past Python's stack, or
# quietly drop a value (a key given twice keeps only the last).
MAX_YAML_BYTES = 1 << 20  # the file itself
MAX_YAML_EXPANDED = 1_000_000  # items and characters once every alias is expanded
MAX_YAML_DEPTH = 50  # nesting levels
_MERGE_TAG = "tag:yaml.org,2002:merge"


def load_yaml(source, where: str):
    """Parse YAML text (str or bytes) with safe types only, refusing a document larger than
    MAX_YAML_BYTES, one that expands past MAX_YAML_EXPANDED through aliases, refers to itself,
    nests deeper than MAX_YAML_DEPTH, or gives a key twice in one mapping.  Errors: UserError."""
    if len(source) > MAX_YAML_BYTES:
        raise UserError(f"{where} is larger than {MAX_YAML_BYTES} bytes", hint="a grid file is a few hundred bytes")
    loader = None
    try:
        loader = yaml.SafeLoader(source)  # reads the first chunk: an encoding error is raised here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_tree(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise UserError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # the parser recurses per nesting level
        raise UserError(f"{where} nests deeper than {MAX_YAML_DEPTH} levels", hint="a grid is a few levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_yaml_tree(root, where: str) -> None:
    """Walk the parsed node graph once (an aliased node is one object, so a bomb costs its
    distinct nodes here, not its expansion) and add up the expanded size."""
    size: dict = {}  # id(node) -> expanded size of its subtree
    open_nodes: set = set()  # entered, not finished: exactly the current node's ancestors
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        nid = id(node)
        children = _yaml_children(node)
        if finished:
            open_nodes.discard(nid)
            total = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else sum(size[id(c)] for c in children))
            if total > MAX_YAML_EXPANDED:
                raise UserError(f"{where}: its aliases expand it past {MAX_YAML_EXPANDED} items and characters",
                                hint="a grid needs no more; write the values out, or use fewer nested aliases")
            size[nid] = total
            continue
        if nid in size:
            continue
        open_nodes.add(nid)
        if len(open_nodes) > MAX_YAML_DEPTH:
            raise UserError(f"{where} nests deeper than {MAX_YAML_DEPTH} levels", hint="a grid is a few levels deep")
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    if (key.tag, key.value) in seen:
                        raise UserError(f"{where}, line {key.start_mark.line + 1}: key {key.value!r} is given twice in "
                                        "one mapping"[:300], hint="keep one (YAML would silently use the last)")
                    seen.add((key.tag, key.value))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise UserError(f"{where}, line {child.start_mark.line + 1}: an alias refers to a node that contains it",
                                hint="a grid cannot hold itself")
            if id(child) not in size:
                stack.append((child, False))


def _yaml_children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
