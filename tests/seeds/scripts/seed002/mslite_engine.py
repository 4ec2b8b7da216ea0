# Seed 002 (MindSpore Lite, "Performing Ascend Backend Multi-card/Multi-core Inference Using Python
# Interfaces"), sample code mslite_engine.py: class MSLitePredict, from the seed's code blocks.
# Lines marked "# reconstructed:" join the seed's fragments into a class as its text describes;
# lines marked "# changed:" differ from the seed.
import orchestrator as mslite  # changed: was `import mindspore_lite as mslite`


class MSLitePredict:  # reconstructed:
    def __init__(self, mindir_file, device_id):  # reconstructed:
        # init and set context
        context = mslite.Context()
        context.target = ["cpu"]  # changed: was ["ascend"] (no Ascend card here)
        context.ascend.device_id = device_id

        # create Model and build Model
        model = mslite.Model()
        model.build_from_file(mindir_file, mslite.ModelType.MINDIR, context)
        self.model = model  # reconstructed:

    def run(self, input_data):  # reconstructed:
        model = self.model  # reconstructed:
        # set model input
        inputs = model.get_inputs()
        for i, _input in enumerate(inputs):
            _input.set_data_from_numpy(input_data[i])

        # execute inference
        outputs = model.predict(inputs)
        return [output.get_data_to_numpy() for output in outputs]  # reconstructed:
