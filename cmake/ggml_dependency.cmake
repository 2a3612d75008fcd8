# Finds ggml and defines the target `dgemma_ggml` (INTERFACE) that the core links against, plus
# DGEMMA_GGML_INSTALL_RPATH: where the installed library looks for ggml at run time.
#
# DGEMMA_GGML selects the source:
#   PYTHON  the ggml-python wheel (headers in site-packages/include, libraries in
#           site-packages/ggml/lib). Its ggml-config.cmake points at the wrong folder and its
#           libraries have no SONAME, so we import them by hand and link them by name.
#   SYSTEM  a ggml installed by the user: find_package(ggml CONFIG) through GGML_DIR or
#           CMAKE_PREFIX_PATH.
#   AUTO    SYSTEM when GGML_DIR is set or a ggml-config.cmake outside Python's site-packages is on
#           CMAKE_PREFIX_PATH, else PYTHON.
set(DGEMMA_GGML "AUTO" CACHE STRING "Where ggml comes from: AUTO, PYTHON or SYSTEM")
set_property(CACHE DGEMMA_GGML PROPERTY STRINGS AUTO PYTHON SYSTEM)

if(APPLE)
    set(_dg_origin "@loader_path")
else()
    set(_dg_origin "$ORIGIN")
endif()

# --- where ggml-python lives (if it is installed in the interpreter that builds us) ---
set(_dg_ggml_py_pkg "")
if(NOT DGEMMA_GGML STREQUAL "SYSTEM")
    if(NOT Python_EXECUTABLE)
        find_package(Python COMPONENTS Interpreter)
    endif()
    if(Python_EXECUTABLE)
        execute_process(
            COMMAND "${Python_EXECUTABLE}" -c
                    "import importlib.util, os; s = importlib.util.find_spec('ggml'); print(os.path.dirname(s.origin) if s and s.origin else '')"
            OUTPUT_VARIABLE _dg_ggml_py_pkg
            OUTPUT_STRIP_TRAILING_WHITESPACE
            ERROR_QUIET)
    endif()
endif()

if(DGEMMA_GGML STREQUAL "AUTO")
    set(_dg_system_prefix "")
    if(DEFINED GGML_DIR OR DEFINED ENV{GGML_DIR})
        set(DGEMMA_GGML_RESOLVED "SYSTEM")
    else()
        set(DGEMMA_GGML_RESOLVED "PYTHON")
        set(_dg_py_site "")
        if(_dg_ggml_py_pkg)
            get_filename_component(_dg_py_site "${_dg_ggml_py_pkg}" DIRECTORY)
        endif()
        set(_dg_prefixes ${CMAKE_PREFIX_PATH})
        if(DEFINED ENV{CMAKE_PREFIX_PATH})
            string(REPLACE ":" ";" _dg_env_prefixes "$ENV{CMAKE_PREFIX_PATH}")
            list(APPEND _dg_prefixes ${_dg_env_prefixes})
        endif()
        foreach(_p IN LISTS _dg_prefixes)
            get_filename_component(_p "${_p}" ABSOLUTE)
            # Python site-packages folders (scikit-build-core puts them on CMAKE_PREFIX_PATH) hold
            # ggml-python's own config, which links by absolute path; that case is PYTHON mode.
            if((_dg_py_site AND _p STREQUAL _dg_py_site) OR EXISTS "${_p}/ggml/__init__.py"
               OR _p MATCHES "(site|dist)-packages$")
                continue()
            endif()
            foreach(_sub "lib/cmake/ggml" "lib64/cmake/ggml" "share/cmake/ggml" ".")
                if(EXISTS "${_p}/${_sub}/ggml-config.cmake")
                    set(DGEMMA_GGML_RESOLVED "SYSTEM")
                    set(_dg_system_prefix "${_p}/${_sub}")
                    break()
                endif()
            endforeach()
            if(_dg_system_prefix)
                break()
            endif()
        endforeach()
    endif()
else()
    set(DGEMMA_GGML_RESOLVED "${DGEMMA_GGML}")
endif()

add_library(dgemma_ggml INTERFACE)

if(DGEMMA_GGML_RESOLVED STREQUAL "SYSTEM")
    # ggml's config looks for its libraries on CMAKE_PREFIX_PATH before its own folder; drop the
    # Python site-packages entries so ggml-python's copies there cannot shadow the user's ggml.
    set(_dg_kept "")
    foreach(_p IN LISTS CMAKE_PREFIX_PATH)
        if(NOT (EXISTS "${_p}/ggml/__init__.py" OR _p MATCHES "(site|dist)-packages/?$"))
            list(APPEND _dg_kept "${_p}")
        endif()
    endforeach()
    set(CMAKE_PREFIX_PATH "${_dg_kept}")  # quoted: an empty list must still hide the cache entry
    if(_dg_system_prefix)
        find_package(ggml CONFIG REQUIRED PATHS "${_dg_system_prefix}" NO_DEFAULT_PATH)
    else()
        # GGML_DIR may name the folder of ggml-config.cmake (as a CMake or environment variable).
        find_package(ggml CONFIG REQUIRED HINTS ${GGML_DIR} $ENV{GGML_DIR})
    endif()
    target_link_libraries(dgemma_ggml INTERFACE ggml::ggml ggml::ggml-base)
    if(NOT APPLE AND NOT WIN32)
        # DT_RPATH rather than DT_RUNPATH: libggml finds its own backends (libggml-cpu, ...) through
        # our path too, so a ggml in a private prefix works without LD_LIBRARY_PATH.
        target_link_options(dgemma_ggml INTERFACE "LINKER:--disable-new-dtags")
    endif()
    set(DGEMMA_GGML_INSTALL_RPATH "")
    set(DGEMMA_GGML_USE_LINK_PATH ON)
    message(STATUS "pydgemma: using the system ggml ${GGML_VERSION} from ${ggml_DIR}")
else()
    if(NOT _dg_ggml_py_pkg)
        message(FATAL_ERROR
            "pydgemma: ggml not found. Install the ggml-python package (pip install ggml-python==0.0.45) "
            "or point GGML_DIR / CMAKE_PREFIX_PATH at your own ggml installation.")
    endif()
    get_filename_component(_dg_py_site "${_dg_ggml_py_pkg}" DIRECTORY)
    set(_dg_inc "${_dg_py_site}/include")
    set(_dg_lib "${_dg_ggml_py_pkg}/lib")
    if(NOT EXISTS "${_dg_inc}/ggml.h" OR NOT EXISTS "${_dg_inc}/gguf.h")
        message(FATAL_ERROR "pydgemma: ggml-python at ${_dg_ggml_py_pkg} has no headers in ${_dg_inc}")
    endif()
    foreach(_name ggml ggml-base)
        set(_file "${_dg_lib}/${CMAKE_SHARED_LIBRARY_PREFIX}${_name}${CMAKE_SHARED_LIBRARY_SUFFIX}")
        if(NOT EXISTS "${_file}")
            message(FATAL_ERROR "pydgemma: ggml-python library not found: ${_file}")
        endif()
        add_library(dgemma_py_${_name} SHARED IMPORTED)
        # No SONAME in these libraries: IMPORTED_NO_SONAME makes CMake link with -L/-l, so the
        # dynamic loader looks the library up by name through our RPATH instead of a build path.
        set_target_properties(dgemma_py_${_name} PROPERTIES
            IMPORTED_LOCATION "${_file}"
            IMPORTED_NO_SONAME TRUE)
        target_link_libraries(dgemma_ggml INTERFACE dgemma_py_${_name})
    endforeach()
    target_include_directories(dgemma_ggml SYSTEM INTERFACE "${_dg_inc}")
    # Installed layout: site-packages/pydgemma/libdgemma.so next to site-packages/ggml/lib.
    set(DGEMMA_GGML_INSTALL_RPATH "${_dg_origin}/../ggml/lib")
    set(DGEMMA_GGML_USE_LINK_PATH OFF)
    set(DGEMMA_GGML_PYTHON_LIB_DIR "${_dg_lib}")
    message(STATUS "pydgemma: using ggml from ggml-python at ${_dg_ggml_py_pkg}")
endif()
