"""The one walker over a model's data flow: what each step of a forward does to its channels.

Four analyses follow tensors through a model's torch.fx graph: layer and branch discovery
(which conv produced this branch of a concatenation), lesions (which tensor holds a unit's
output), the weight graph (which layers feed which) and the wiring of weight analyses (which
layer's units are a conv's input channels). They all ask the same questions of each step: does
channel i of its output come from channel i of its input, and does it change the values? The
answers must agree, or the analyses disagree about the same model; so the lists of modules and
functions, and the walks over them, live here and nowhere else.

Every step of a traced forward is classified into one `Step`:
- LAYER: a conv or linear module (subclasses included, wherever they are defined, e.g. a
  "static same padding" conv with its own forward), whose units are channels / features;
- AFFINE: per-channel affine maps at evaluation (batch norm);
- ACTIVATION: elementwise nonlinearities (modules, functions or tensor methods);
- IDENTITY: steps that pass values unchanged at evaluation (dropout, nn.Identity, .contiguous());
- PRESERVING: steps that keep channel i as channel i but change values (pooling, padding, local
  response norm, instance norm, modules marked `netanatomy_transparent`);
- SCALE: arithmetic of one computed tensor with constants or buffers (`x * 255 - 117`,
  `(x - self.mean) / self.std`): channel i stays channel i;
- RESHAPE: flatten / view / reshape (a linear layer reading a map);
- CHANNELWISE: any other op of one computed tensor that keeps the batch and channel sizes
  (`x.pow(2)`, `x.mean((2, 3))`; known only after shape propagation);
- CONCAT, ELEMENTWISE (a binary op of two computed tensors, such as a residual sum), INPUT,
  CONSTANT (parameters and buffers read with get_attr), OUTPUT, OTHER.

Callers choose which kinds a walk may pass (`walk_back(node, through=...)`); the kinds
themselves are decided once.
"""
from __future__ import annotations

import enum
import operator
import weakref
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# The one list of what each module and function is

ANALYZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose weight is [out, in, *kernel]
AFFINE_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU,
)
IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
PRESERVING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.LocalResponseNorm,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
    nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.InstanceNorm1d, nn.InstanceNorm2d,
)
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
# every module a channel may pass through unchanged in identity (used by the module-call fallback)
CHANNEL_PRESERVING_MODULES = IDENTITY_MODULES + PRESERVING_MODULES

# elementwise activations as functions or tensor methods, by the name analyses record
ACTIVATION_FUNCTIONS = {
    torch.relu: "relu", F.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.gelu: "gelu",
    F.silu: "silu", F.elu: "elu", F.leaky_relu: "leaky_relu", F.hardswish: "hardswish", F.mish: "mish",
    F.softplus: "softplus", F.hardtanh: "hardtanh", F.hardsigmoid: "hardsigmoid",
}
ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
                      "tanh_": "tanh"}
AFFINE_FUNCTIONS = {F.batch_norm}
IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
IDENTITY_METHODS = {"contiguous", "clone", "float", "double", "half", "to", "detach", "type_as"}
PRESERVING_FUNCTIONS = {
    F.pad, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d, F.local_response_norm,
    F.instance_norm, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, torch.avg_pool1d,
}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
RESHAPE_METHODS = {"flatten", "view", "reshape"}
CAT_FUNCTIONS = {torch.cat, torch.concat}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
ARITHMETIC_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                        operator.truediv, operator.itruediv, operator.neg, torch.add, torch.sub, torch.mul,
                        torch.div, torch.neg}
ARITHMETIC_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "neg"}

# functions that turn a hooked pre-activation into the post-activation value
TRANSFORMS = {
    "relu": F.relu, "relu6": F.relu6, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu,
    "silu": F.silu, "elu": F.elu, "leaky_relu": F.leaky_relu, "hardswish": F.hardswish, "mish": F.mish,
    "softplus": F.softplus, "hardtanh": F.hardtanh, "hardsigmoid": F.hardsigmoid,
}


class Step(str, enum.Enum):
    INPUT = "input"
    CONSTANT = "constant"
    OUTPUT = "output"
    LAYER = "layer"
    AFFINE = "affine"
    ACTIVATION = "activation"
    IDENTITY = "identity"
    PRESERVING = "preserving"
    SCALE = "scale"
    RESHAPE = "reshape"
    CHANNELWISE = "channelwise"
    CONCAT = "concat"
    ELEMENTWISE = "elementwise"
    OTHER = "other"


# Functions and tensor methods by kind, in the order they are tried (arithmetic last: it is
# SCALE or ELEMENTWISE by how many computed tensors it reads).
_FUNCTION_STEPS = (
    (CAT_FUNCTIONS, Step.CONCAT), (ACTIVATION_FUNCTIONS, Step.ACTIVATION), (AFFINE_FUNCTIONS, Step.AFFINE),
    (IDENTITY_FUNCTIONS, Step.IDENTITY), (PRESERVING_FUNCTIONS, Step.PRESERVING), (RESHAPE_FUNCTIONS, Step.RESHAPE),
    (ARITHMETIC_FUNCTIONS, Step.ELEMENTWISE),
)
_METHOD_STEPS = (
    (ACTIVATION_METHODS, Step.ACTIVATION), (IDENTITY_METHODS, Step.IDENTITY), (RESHAPE_METHODS, Step.RESHAPE),
    (ARITHMETIC_METHODS, Step.ELEMENTWISE),
)

# The walks callers use. Back to the layer whose units a tensor carries (channel i stays unit i):
CHANNEL_STEPS = frozenset({Step.AFFINE, Step.ACTIVATION, Step.IDENTITY, Step.PRESERVING, Step.SCALE})
# ... and to the layers whose units a weight's input columns are (a linear layer reads a map flat):
FEEDING_STEPS = CHANNEL_STEPS | {Step.RESHAPE, Step.CHANNELWISE}


def is_marked(module: nn.Module) -> bool:
    """A user module that declares itself one opaque, channel-preserving step."""
    return bool(getattr(module, "netanatomy_transparent", False) or getattr(module, "netanatomy_leaf", False))


def module_step(m: nn.Module) -> Step:
    """The kind of a module called as one step (leaf modules only)."""
    if isinstance(m, ANALYZABLE):
        return Step.LAYER
    if isinstance(m, AFFINE_MODULES):
        return Step.AFFINE
    if isinstance(m, ACTIVATION_MODULES):
        return Step.ACTIVATION
    if isinstance(m, IDENTITY_MODULES):
        return Step.IDENTITY
    if isinstance(m, PRESERVING_MODULES) or is_marked(m):
        return Step.PRESERVING
    if isinstance(m, RESHAPE_MODULES):
        return Step.RESHAPE
    return Step.OTHER


def is_depthwise(m: nn.Module) -> bool:
    """A conv whose every group reads one input channel (MobileNet's depthwise convs): its
    groups are per-channel filters, not branches of the layer."""
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups > 1 and m.groups == m.in_channels


def activation_module_name(m: nn.Module) -> str | None:
    return type(m).__name__.lower() if isinstance(m, ACTIVATION_MODULES) else None


class Tracer(fx.Tracer):
    """torch.fx tracing as every netanatomy walk sees a model.

    Leaves: torch.nn's own modules, every module of a kind listed above (so a conv subclass
    defined elsewhere, with its own forward, is one conv call like its parent), and modules
    marked `netanatomy_transparent` / `netanatomy_leaf`.
    """

    _LEAF_KINDS = ANALYZABLE + AFFINE_MODULES + ACTIVATION_MODULES + IDENTITY_MODULES + PRESERVING_MODULES + RESHAPE_MODULES

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_marked(m) or isinstance(m, self._LEAF_KINDS) or super().is_leaf_module(m, module_qualified_name)


def probe_input(module: nn.Module, shape: Sequence[int], batch: int = 2) -> torch.Tensor:
    """A fixed random input in [0, 1]; random, not zeros, so that different tensors differ."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(1234)
    return torch.rand((batch, *shape), generator=gen).to(device=device, dtype=dtype)


def trace(module: nn.Module) -> fx.GraphModule:
    """An fx GraphModule of `module` as every walk sees it (raises what torch.fx raises)."""
    return fx.GraphModule(module, Tracer().trace(module))


class DataFlow:
    """A model's traced forward, with tensor shapes when an input shape is given, and the one
    classification of its steps."""

    def __init__(self, module: nn.Module, input_shape: Sequence[int] | None = None,
                 gm: fx.GraphModule | None = None):
        self.module = module
        self.gm = gm if gm is not None else trace(module)
        self.graph = self.gm.graph
        self.modules = dict(self.gm.named_modules())
        self.input_shape = tuple(input_shape) if input_shape else None
        if self.input_shape:
            from torch.fx.passes.shape_prop import ShapeProp

            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    ShapeProp(self.gm).propagate(probe_input(module, self.input_shape))
            finally:
                module.train(was_training)
        self.nodes = list(self.graph.nodes)
        counts: dict[str, int] = defaultdict(int)
        self.calls: dict[fx.Node, int] = {}  # call index of each call_module node, per module
        for node in self.nodes:
            if node.op == "call_module":
                self.calls[node] = counts[node.target]
                counts[node.target] += 1

    # -- one node ----------------------------------------------------------------------------
    def mod(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        """The node's shape without the batch dimension (after shape propagation)."""
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            return None
        return tuple(meta.shape[1:])

    @staticmethod
    def tensor_args(node: fx.Node) -> list[fx.Node]:
        """The computed tensors a node reads, in order (parameters and buffers left out)."""
        out: list[fx.Node] = []

        def visit(a):
            if isinstance(a, fx.Node):
                if a.op != "get_attr" and a not in out:
                    out.append(a)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    visit(b)
            elif isinstance(a, dict):
                for b in a.values():
                    visit(b)

        visit(node.args)
        visit(node.kwargs)
        return out

    def step(self, node: fx.Node) -> Step:
        if node.op == "placeholder":
            return Step.INPUT
        if node.op == "get_attr":
            return Step.CONSTANT
        if node.op == "output":
            return Step.OUTPUT
        if node.op == "call_module":
            m = self.mod(node)
            return module_step(m) if m is not None else Step.OTHER
        target = node.target
        table = _FUNCTION_STEPS if node.op == "call_function" else _METHOD_STEPS if node.op == "call_method" else ()
        for names, kind in table:
            if target in names:
                if kind is Step.ELEMENTWISE:    # arithmetic: with constants only, channel i stays i
                    return Step.SCALE if len(self.tensor_args(node)) == 1 else Step.ELEMENTWISE
                return kind
        if self._keeps_channels(node):
            return Step.CHANNELWISE
        return Step.OTHER

    def _keeps_channels(self, node: fx.Node) -> bool:
        args = self.tensor_args(node)
        out = node.meta.get("tensor_meta")
        if len(args) != 1 or out is None or not hasattr(out, "shape"):
            return False
        meta_in = args[0].meta.get("tensor_meta")
        if meta_in is None or not hasattr(meta_in, "shape"):
            return False
        shape_in, shape_out = tuple(meta_in.shape), tuple(out.shape)
        return len(shape_in) >= 2 and len(shape_out) >= 2 and shape_in[:2] == shape_out[:2]

    def activation_name(self, node: fx.Node) -> str | None:
        """The recorded name of an activation step ("relu", "relu6", ...), else None."""
        m = self.mod(node)
        if m is not None:
            return activation_module_name(m)
        if node.op == "call_function":
            return ACTIVATION_FUNCTIONS.get(node.target)
        if node.op == "call_method":
            return ACTIVATION_METHODS.get(node.target)
        return None

    def is_add(self, node: fx.Node) -> bool:
        """A sum of two computed tensors (a residual sum when their shapes agree)."""
        is_sum = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in ADD_METHODS)
        return is_sum and len(node.args) >= 2 and all(isinstance(a, fx.Node) and a.op != "get_attr"
                                                      for a in node.args[:2])

    def is_layer(self, node: fx.Node) -> bool:
        return self.step(node) is Step.LAYER

    # -- walks -------------------------------------------------------------------------------
    def walk_back(self, node: fx.Node, through: Iterable[Step] = CHANNEL_STEPS) -> fx.Node:
        """From a node back through steps of the kinds `through` (each read along its first
        computed input) to the first node of another kind."""
        through = frozenset(through)
        for _ in range(4096):
            if self.step(node) not in through:
                return node
            args = self.tensor_args(node)
            if not args:
                return node
            node = args[0]
        return node

    def producer(self, node: fx.Node, through: Iterable[Step] = CHANNEL_STEPS) -> fx.Node | None:
        """The conv/linear call whose units `node` carries, or None."""
        src = self.walk_back(node, through)
        return src if self.is_layer(src) else None

    def unit_output(self, node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
        """Where a conv/linear call's units have their values: (pre, activation).

        pre is the layer's output after the per-channel affine steps (batch norm) that alone
        read it; activation is the one elementwise nonlinearity that alone reads pre, or None.
        A unit's output (what a lesion sets to 0) is the activation's output, else pre.
        Anything after that (a batch norm after the ReLU, pooling, dropout) is downstream.
        """
        cur = node
        for _ in range(16):
            users = list(cur.users)
            if len(users) == 1 and self.step(users[0]) is Step.AFFINE and self.tensor_args(users[0])[:1] == [cur]:
                cur = users[0]
                continue
            break
        users = list(cur.users)
        act = users[0] if len(users) == 1 and self.step(users[0]) is Step.ACTIVATION else None
        return cur, act

    def readers(self, node: fx.Node, through: Iterable[Step] = CHANNEL_STEPS) -> list[fx.Node] | None:
        """The conv/linear calls that read `node`'s units through steps of `through`; None when
        something else reads them too (the units do not go only to layers)."""
        through = frozenset(through)
        found, frontier, seen = [], list(node.users), set()
        while frontier:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            kind = self.step(user)
            if kind is Step.LAYER:
                found.append(user)
            elif kind in through:
                frontier.extend(user.users)
            else:
                return None
        return found

    def sole_reader(self, node: fx.Node, through: Iterable[Step] = (Step.IDENTITY,)) -> fx.Node | None:
        """The one node that reads `node` (past single-reader steps of `through`), or None."""
        through = frozenset(through)
        cur = node
        for _ in range(64):
            if len(cur.users) != 1:
                return None
            user = next(iter(cur.users))
            if self.step(user) in through:
                cur = user
                continue
            return user
        return None

    def calls_of(self, module_name: str) -> list[fx.Node]:
        return [n for n in self.nodes if n.op == "call_module" and str(n.target) == module_name]


_FLOWS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, DataFlow]]" = weakref.WeakKeyDictionary()


def dataflow(module: nn.Module, input_shape: Sequence[int] | None = None) -> DataFlow:
    """The DataFlow of `module` (cached per module and input shape; raises what torch.fx raises)."""
    key = tuple(input_shape) if input_shape else ()
    per = _FLOWS.setdefault(module, {})
    if key not in per:
        per[key] = DataFlow(module, key or None)
    return per[key]


__all__ = [
    "ACTIVATION_FUNCTIONS", "ACTIVATION_METHODS", "ACTIVATION_MODULES", "AFFINE_MODULES", "ANALYZABLE",
    "CHANNEL_PRESERVING_MODULES", "CHANNEL_STEPS", "DataFlow", "FEEDING_STEPS", "IDENTITY_MODULES",
    "PRESERVING_MODULES", "Step", "TRANSFORMS", "Tracer", "WEIGHT_MODULES", "dataflow", "is_depthwise", "is_marked",
    "module_step", "probe_input", "trace",
]
