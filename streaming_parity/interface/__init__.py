"""The streaming interface: what every backend implements and the types that cross it.

Nothing here knows a backend, a fixture or a verdict. ``backend`` holds ``Backend`` and its
``Capabilities``, ``taps`` the tap names, ``types`` the step and state types, ``model_info`` what
the harness knows of a model (and its prompt kernel), ``quantization`` an int8 file's scheme,
``decoding`` the greedy decoding helpers backends share, ``peer`` what a peer runtime says about
itself (``PeerRuntime``), ``chunking`` the chunk schedule, ``speakers`` the multitalker masks,
``audio`` and ``utterance`` the input, ``frontend`` NeMo's mel front end in numpy, ``driver`` the
loop that feeds a schedule through one backend, and ``commands`` the contract between the
``parity`` command line and the commands a backend contributes.
"""
